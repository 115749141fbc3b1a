"""One distillation step of a student: the student's pass over its share of the global batch, DINO +
iBOT + KoLeo against the frozen teacher's targets (the SSL model's own loss terms and weights),
AdamW and the student's EMA (`teacher_momentum` in the metrics). The EMA, the SSL model's `teacher`
branch, is what gets exported."""

from __future__ import annotations

import torch
import torch.distributed as dist

from dinoscale.train.optim import apply_schedules
from dinoscale.train.schedules import Schedules
from dinoscale.train.ssl import SSLMetaArch
from dinoscale.train.trainer import finish_step


def student_step(model: SSLMetaArch, optimizer: torch.optim.Optimizer, schedules: Schedules, batch: dict,
                 iteration: int, *, clip_grad: float, autocast: torch.autocast, seed: int,
                 group: dist.ProcessGroup) -> dict[str, float]:
    """One iteration of the student on `batch` (from `BatchRouting.student_batch`); the loss metrics
    are averaged over the student's group. Returns the step's metrics."""
    scheduled = apply_schedules(optimizer, schedules, iteration)
    optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with autocast:
        student_out = model.student_outputs(batch["collated_global_crops"], batch["collated_local_crops"],
                                            batch["collated_masks"], batch["mask_indices_list"])
        targets = {"cls_probs": batch["cls_probs"], "masked_patch_probs": batch["masked_patch_probs"]}
        total, terms = model.loss_terms(targets, student_out, batch["masks_weight"], None)
    total.backward()
    metrics = dict(zip(terms, torch.stack([t.detach().float() for t in terms.values()]).tolist()))
    metrics["total_loss"] = float(total.detach())
    return finish_step(model, optimizer, schedules, metrics, scheduled, iteration, clip_grad, group)
