"""The SSL meta-architecture: student, EMA teacher, optional Gram teacher, and their losses.

One training step is `forward_backward(batch, iteration, teacher_temp)`: teacher targets on the
global crops, one student pass over all global crops (masked) and all local crops, the weighted
loss terms (DINOv2/DINOv3 weighting), and the backward pass. The schedules, the optimiser step,
the EMA update (`update_teacher`) and gradient clipping belong to the training loop, which may wrap
`student`, `teacher` and `gram_teacher` (nn.ModuleDicts) with FSDP2 as they are.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from dinoscale.config import Config
from dinoscale.errors import ConfigError
from dinoscale.losses import DINOLoss, GramLoss, KoLeoLoss, iBOTPatchLoss, resize_patch_grid
from dinoscale.models.head import build_head
from dinoscale.models.init import InitStep, eager_init_steps
from dinoscale.models.presets import build_backbone
from dinoscale.train.config import DinoConfig, IbotConfig

N_GLOBAL_CROPS = 2
BRANCHES = ("student", "teacher", "gram_teacher")


class SSLMetaArch(nn.Module):
    """student / teacher = ModuleDict{backbone, dino_head, ibot_head}; gram_teacher = ModuleDict{backbone}."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.ibot_separate_head = cfg.ibot.separate_head
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.do_koleo = cfg.dino.koleo_loss_weight > 0
        self.do_gram = cfg.gram.use_loss

        backbone = build_backbone(cfg.student)
        student = {"backbone": backbone, "dino_head": _head(backbone.embed_dim, cfg.dino)}
        if self.ibot_separate_head:
            student["ibot_head"] = _head(backbone.embed_dim, cfg.ibot)
        self.student = nn.ModuleDict(student)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.gram_teacher = None
        if self.do_gram:
            self.gram_teacher = nn.ModuleDict({"backbone": copy.deepcopy(backbone)}).requires_grad_(False)

        normalisation = cfg.train.centering
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes, cfg.dino.student_temp, cfg.dino.center_momentum,
                                  normalisation)
        ibot_prototypes = cfg.ibot.head_n_prototypes if self.ibot_separate_head else cfg.dino.head_n_prototypes
        self.ibot_patch_loss = iBOTPatchLoss(ibot_prototypes, cfg.dino.student_temp, cfg.dino.center_momentum,
                                             normalisation)
        self.koleo_loss = KoLeoLoss(distributed=cfg.dino.koleo_loss_distributed,
                                    ranks_per_group=cfg.dino.koleo_distributed_replicas)
        self.gram_loss = GramLoss(cfg.gram.normalized, cfg.gram.img_level, cfg.gram.remove_neg,
                                  cfg.gram.remove_only_teacher_neg)
        if self.do_gram:  # check the resize options now rather than at the first Gram step
            resize_patch_grid(torch.zeros(1, 4, 1), (1, 1), cfg.gram.global_teacher_resize_method,
                              cfg.gram.global_teacher_resize_antialias)
        self.train()

    def branches(self) -> list[nn.ModuleDict]:
        """Student, teacher and (when Gram anchoring is on) Gram teacher."""
        return [b for b in (self.student, self.teacher, self.gram_teacher) if b is not None]

    # ------------------------------------------------------------------ modes and teachers
    def train(self, mode: bool = True) -> "SSLMetaArch":
        super().train(mode)
        self.teacher.eval()
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter
        (the local shards under FSDP2, which student and teacher share)."""
        student_params, teacher_params = [], []
        for name in self.student.keys():
            pairs = zip(self.student[name].parameters(), self.teacher[name].parameters(), strict=True)
            for student_param, teacher_param in pairs:
                student_params.append(_local(student_param))
                teacher_params.append(_local(teacher_param))
        # one pass over the weights: teacher + (1 - momentum) * (student - teacher)
        torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)

    @torch.no_grad()
    def update_gram_teacher(self) -> None:
        """Copy the EMA teacher's backbone into the Gram teacher."""
        if self.gram_teacher is None:
            raise ConfigError("update_gram_teacher needs gram.use_loss=true")
        copy_weights(self.teacher.backbone, self.gram_teacher.backbone)

    def gram_update_due(self, iteration: int) -> bool:
        """Whether the Gram teacher is refreshed at `iteration`: at gram.it_first_update, then every
        gram.update_frequency iterations, at most gram.max_updates times (a pure function, for resume)."""
        gram = self.cfg.gram
        since_first = iteration - gram.it_first_update
        if not self.do_gram or since_first < 0 or since_first % gram.update_frequency:
            return False
        return gram.max_updates is None or since_first // gram.update_frequency < gram.max_updates

    def gram_active(self, iteration: int) -> bool:
        return self.do_gram and iteration >= self.cfg.gram.it_first_update

    # ------------------------------------------------------------------ one step
    def forward_backward(self, batch: dict[str, Any], iteration: int,
                         teacher_temp: float) -> tuple[Tensor, dict[str, float]]:
        """Refresh the Gram teacher when due, compute every loss term at the teacher temperature of the
        iteration, backpropagate the total.

        Returns the total loss (detached) and the metrics: each loss term unweighted, its weight,
        the teacher temperature and two collapse diagnostics of the teacher's softmax.
        """
        if self.gram_update_due(iteration):
            self.update_gram_teacher()
        device = next(self.student.parameters()).device
        global_crops = batch["collated_global_crops"].to(device, non_blocking=True)
        local_crops = batch["collated_local_crops"].to(device, non_blocking=True)
        masks = batch["collated_masks"].to(device, non_blocking=True)
        mask_indices = batch["mask_indices_list"].to(device, non_blocking=True)
        masks_weight = batch["masks_weight"].to(device, non_blocking=True)

        teacher_out = self.teacher_targets(global_crops, mask_indices, teacher_temp)
        student_out = self.student_outputs(global_crops, local_crops, masks, mask_indices)
        gram_targets = None
        if self.gram_active(iteration):
            gram_crops = batch.get("collated_gram_teacher_crops")
            gram_input = global_crops if gram_crops is None else gram_crops.to(device, non_blocking=True)
            gram_targets = self.gram_teacher_patches(gram_input, student_out["global_patch_tokens"].shape[1])
        total, terms = self.loss_terms(teacher_out, student_out, masks_weight, gram_targets)
        total.backward()
        tracked = {**terms, "total_loss": total, "teacher_entropy": teacher_out["entropy"],
                   "teacher_marginal_entropy": teacher_out["marginal_entropy"]}
        # one host sync for all values (a float() per value would wait for the device each time)
        metrics = dict(zip(tracked, torch.stack([v.detach().float() for v in tracked.values()]).tolist()))
        weights = self.loss_weights(student_out["local_cls_logits"].shape[0])
        metrics.update({f"{name}_weight": weights[name] for name in terms}, teacher_temp=teacher_temp)
        return total.detach(), metrics

    @torch.no_grad()
    def teacher_targets(self, global_crops: Tensor, mask_indices: Tensor, teacher_temp: float) -> dict[str, Any]:
        """Teacher target distributions: cls_probs [2, B, K] and masked_patch_probs [M, K_ibot]."""
        out = self.teacher.backbone(global_crops, is_training=True)
        cls_tokens = out["x_norm_clstoken"]
        masked_patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        cls_logits, masked_logits = self._heads(self.teacher, cls_tokens, masked_patches)
        return {
            "cls_probs": self.dino_loss.teacher_probs(cls_logits, teacher_temp).unflatten(0, (N_GLOBAL_CROPS, -1)),
            "masked_patch_probs": (self.ibot_patch_loss.teacher_probs(masked_logits, teacher_temp)
                                   if self.do_ibot else None),
            **_softmax_entropies(cls_logits, teacher_temp),
        }

    def student_outputs(self, global_crops: Tensor, local_crops: Tensor, masks: Tensor,
                        mask_indices: Tensor) -> dict[str, Tensor]:
        """One backbone pass over [masked global crops, local crops]; each head once."""
        batch = global_crops.shape[0] // N_GLOBAL_CROPS
        n_local = local_crops.shape[0] // batch if local_crops.numel() else 0
        inputs, input_masks = [global_crops], [masks if self.do_ibot else None]
        if n_local:
            inputs.append(local_crops)
            input_masks.append(None)
        outs = self.student.backbone(inputs, masks=input_masks, is_training=True)
        global_cls = outs[0]["x_norm_clstoken"]
        cls_tokens = torch.cat([global_cls] + [o["x_norm_clstoken"] for o in outs[1:]])
        patch_tokens = outs[0]["x_norm_patchtokens"]
        masked_patches = patch_tokens.flatten(0, 1).index_select(0, mask_indices)
        cls_logits, masked_logits = self._heads(self.student, cls_tokens, masked_patches)
        return {
            "global_cls_tokens": global_cls,
            "global_patch_tokens": patch_tokens,
            "global_cls_logits": cls_logits[:global_cls.shape[0]].unflatten(0, (N_GLOBAL_CROPS, batch)),
            "local_cls_logits": cls_logits[global_cls.shape[0]:].unflatten(0, (n_local, batch)),
            "masked_patch_logits": masked_logits,
        }

    def _heads(self, model: nn.ModuleDict, cls_tokens: Tensor, masked_patches: Tensor) -> tuple[Tensor, Tensor | None]:
        """DINO head on CLS tokens, iBOT head on masked patch tokens (one pass when the head is shared)."""
        if not self.do_ibot:
            return model.dino_head(cls_tokens), None
        if not self.ibot_separate_head:
            logits = model.dino_head(torch.cat([cls_tokens, masked_patches]))
            return logits[:cls_tokens.shape[0]], logits[cls_tokens.shape[0]:]
        return model.dino_head(cls_tokens), model.ibot_head(masked_patches)

    @torch.no_grad()
    def gram_teacher_patches(self, gram_crops: Tensor, n_student_patches: int) -> Tensor:
        """Gram-teacher patch features [2B, N, D] on the student's patch grid."""
        patches = self.gram_teacher.backbone(gram_crops, is_training=True)["x_norm_patchtokens"]
        side = math.isqrt(n_student_patches)
        return resize_patch_grid(patches, (side, side), self.cfg.gram.global_teacher_resize_method,
                                 self.cfg.gram.global_teacher_resize_antialias)

    def loss_weights(self, n_local_crops: int) -> dict[str, float]:
        """Weights of the loss terms. DINO terms are weighted by their share of the student/teacher
        crop pairs (global: 2*1 without same-view pairs, else 2*2; local: 2*n_local); KoLeo is summed
        over the two global crops."""
        cfg = self.cfg
        global_pairs = N_GLOBAL_CROPS * (N_GLOBAL_CROPS - 1) if cfg.dino.global_ignore_diagonal else N_GLOBAL_CROPS**2
        local_pairs = N_GLOBAL_CROPS * n_local_crops
        all_pairs = global_pairs + local_pairs
        return {
            "dino_global_crops_loss": cfg.dino.loss_weight * global_pairs / all_pairs,
            "dino_local_crops_loss": cfg.dino.loss_weight * local_pairs / all_pairs,
            "koleo_loss": cfg.dino.koleo_loss_weight * N_GLOBAL_CROPS,
            "ibot_loss": cfg.ibot.loss_weight,
            "gram_loss": cfg.gram.loss_weight,
        }

    def loss_terms(self, teacher_out: dict[str, Any], student_out: dict[str, Tensor], masks_weight: Tensor,
                   gram_targets: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted total and every term, unweighted (0-d tensors)."""
        n_local = student_out["local_cls_logits"].shape[0]
        weights = self.loss_weights(n_local)
        terms: dict[str, Tensor] = {
            "dino_global_crops_loss": self.dino_loss(student_out["global_cls_logits"], teacher_out["cls_probs"],
                                                     ignore_diagonal=self.cfg.dino.global_ignore_diagonal),
        }
        if n_local:
            terms["dino_local_crops_loss"] = self.dino_loss(student_out["local_cls_logits"], teacher_out["cls_probs"])
        if self.do_koleo:
            per_crop = student_out["global_cls_tokens"].chunk(N_GLOBAL_CROPS)
            terms["koleo_loss"] = sum(self.koleo_loss(tokens) for tokens in per_crop) / N_GLOBAL_CROPS
        if self.do_ibot:
            n_images = student_out["global_patch_tokens"].shape[0]
            terms["ibot_loss"] = self.ibot_patch_loss(student_out["masked_patch_logits"],
                                                      teacher_out["masked_patch_probs"], masks_weight, n_images)
        if gram_targets is not None:
            terms["gram_loss"] = self.gram_loss(student_out["global_patch_tokens"], gram_targets)
        total = sum(weights[name] * value for name, value in terms.items())
        return total, terms


def _local(param: Tensor) -> Tensor:
    """This rank's shard of a parameter (the parameter itself when it is not sharded)."""
    return param.detach().to_local() if isinstance(param, DTensor) else param.detach()


def local_tensors(module: nn.Module) -> list[Tensor]:
    """This rank's part of every parameter and buffer of `module`, in a fixed order."""
    return [_local(t) for t in (*module.parameters(), *module.buffers())]


@torch.no_grad()
def copy_weights(source: nn.Module, target: nn.Module) -> None:
    """Copy every parameter and buffer, shard to shard (both modules sharded the same way)."""
    torch._foreach_copy_(local_tensors(target), local_tensors(source))


def student_init_steps(student: nn.ModuleDict) -> Iterator[InitStep]:
    """The student's initialisation in the RNG order of `SSLMetaArch.__init__`: the backbone, then
    each head (the teachers are copies of the student)."""
    for part in student.values():
        yield from eager_init_steps(part)


def _head(in_dim: int, section: DinoConfig | IbotConfig) -> nn.Module:
    return build_head(in_dim, section.head_n_prototypes, section.head_hidden_dim, section.head_bottleneck_dim,
                      section.head_nlayers)


def _softmax_entropies(logits: Tensor, temperature: float) -> dict[str, Tensor]:
    """Mean per-sample entropy of softmax(logits / T) (log K: uniform outputs) and the entropy of the
    batch-mean distribution (0: every sample on one prototype)."""
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    probs = log_probs.exp()
    mean_probs = probs.mean(dim=0)
    return {"entropy": -(probs * log_probs).sum(-1).mean(),
            "marginal_entropy": -(mean_probs * mean_probs.clamp_min(1e-30).log()).sum()}
