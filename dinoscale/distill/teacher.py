"""The frozen teacher of a distillation: the EMA teacher (backbone, DINO head, iBOT head) of a
dinoscale training run, sharded over all ranks with FSDP2, and its targets.

Every rank runs it on its own share of the global batch; its prototype assignments are
Sinkhorn-Knopp normalised over the whole global batch (the reductions span all ranks), so they do
not depend on how the batch is split.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from dinoscale.config import load_config
from dinoscale.errors import CheckpointError
from dinoscale.losses.targets import sinkhorn_knopp
from dinoscale.train.checkpoint import latest_checkpoint
from dinoscale.train.parallel import parallelize
from dinoscale.train.ssl import SSLMetaArch


def _needed_heads(cfg: DictConfig) -> list[str]:
    return ["dino_head", "ibot_head"] if cfg.ibot.separate_head else ["dino_head"]


def teacher_run_config(run_dir: str) -> DictConfig:
    """The teacher run's config, after checking that its latest checkpoint holds the EMA teacher's
    backbone and the heads distillation needs (reads only the checkpoint's metadata)."""
    if not run_dir:
        raise CheckpointError("distill.teacher is not set: give the folder of a dinoscale training run")
    path = Path(run_dir)
    if path.is_file():
        raise CheckpointError(f"distill.teacher = {run_dir} is a weights file, which holds a backbone without the DINO "
                              "and iBOT heads distillation needs; give the training run's folder (config.yaml and "
                              "checkpoints/step_*)")
    checkpoint = latest_checkpoint(path)
    if not (path / "config.yaml").exists() or checkpoint is None:
        raise CheckpointError(f"distill.teacher = {run_dir} is not a training run with a checkpoint (expected "
                              "config.yaml and checkpoints/step_*)")
    cfg = load_config(str(path / "config.yaml"))
    saved = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    for part in ("backbone", *_needed_heads(cfg)):
        if not any(key.startswith(f"model.teacher.{part}.") for key in saved):
            raise CheckpointError(f"teacher checkpoint {checkpoint} has no teacher {part}; distillation needs the EMA "
                                  f"teacher's backbone and its {' and '.join(_needed_heads(cfg))}")
    return cfg


class FrozenTeacher:
    """The teacher branch of a run's SSL model, sharded over all ranks, weights from its latest checkpoint."""

    def __init__(self, run_dir: str, cfg: DictConfig, device: torch.device, world_size: int,
                 compute_dtype: torch.dtype):
        with torch.device("meta"):
            self.modules: nn.ModuleDict = SSLMetaArch(cfg).teacher  # the student and Gram teacher stay on meta
        self.separate_ibot_head = cfg.ibot.separate_head
        parallelize([self.modules], device, world_size, compute_dtype)
        self.modules.to_empty(device=device)
        state = get_model_state_dict(self.modules)
        # the checkpoint's entries are named from the SSL model's root; read only the teacher's
        saved = {f"teacher.{name}": tensor for name, tensor in state.items()}
        dcp.load({"model": saved}, checkpoint_id=str(latest_checkpoint(run_dir)))
        set_model_state_dict(self.modules, {name: saved[f"teacher.{name}"] for name in state},
                             options=StateDictOptions(strict=True))
        self.modules.eval().requires_grad_(False)

    @torch.no_grad()
    def targets(self, global_crops: Tensor, mask_indices: Tensor, teacher_temp: float) -> tuple[Tensor, Tensor]:
        """DINO targets [n_global*B, K] of this rank's global crops (crop-major) and iBOT targets
        [M, K_ibot] of their masked patches (in `mask_indices` order), Sinkhorn-Knopp normalised over
        all ranks."""
        out = self.modules.backbone(global_crops, is_training=True)
        masked_patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        ibot_head = self.modules.ibot_head if self.separate_ibot_head else self.modules.dino_head
        cls_logits = self.modules.dino_head(out["x_norm_clstoken"])
        patch_logits = ibot_head(masked_patches)
        return sinkhorn_knopp(cls_logits, teacher_temp), sinkhorn_knopp(patch_logits, teacher_temp)
