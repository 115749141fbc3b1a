"""`dinoscale distill CONFIG --dry-run`: the plan of a distillation job and what each rank holds,
from the models built on the meta device (no memory, no process group): the teacher's shard over
all ranks, and each student's shard of weights, gradients, AdamW moments and EMA over its group."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from dinoscale.distill.plan import make_plan
from dinoscale.train.memory import GIB, frozen_bytes, training_memory
from dinoscale.train.ssl import SSLMetaArch


def implied_world_size(cfg: DictConfig) -> int:
    """The number of ranks the students' groups span (the end of the last ranks_range)."""
    return max((s.ranks_range[-1] for s in cfg.distill.students if s.ranks_range), default=1)


def _params(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:,.1f} M parameters"


def dry_run(cfg: DictConfig, world_size: int | None = None) -> str:
    world = world_size or implied_world_size(cfg)
    plan = make_plan(cfg, world)
    with torch.device("meta"):
        teacher = SSLMetaArch(plan.teacher_cfg).teacher
    teacher_gib = frozen_bytes(teacher, world) / GIB
    lines = [f"teacher {plan.teacher_cfg.student.arch} with heads ({_params(teacher)}) from {cfg.distill.teacher}: "
             f"sharded over all {world} ranks, {teacher_gib:.2f} GiB per rank; each rank runs it on "
             f"{plan.global_batch // world} of the {plan.global_batch} images of a step"]
    for student in plan.students:
        with torch.device("meta"):
            model = SSLMetaArch(student.cfg)
        memory = training_memory(model, len(student.ranks))
        lines.append(
            f"student {student.name}: {student.cfg.student.arch} with heads ({_params(model.student)}), ranks "
            f"{student.ranks[0]}-{student.ranks[-1]} ({len(student.ranks)}), {plan.global_batch // len(student.ranks)} "
            f"images per rank, {memory['per_rank_gib'] + teacher_gib:.2f} GiB per rank "
            f"(weights, gradients and AdamW {memory['student_params_grads_adamw_gib']:.2f}, EMA "
            f"{memory['teachers_gib']:.2f}, teacher shard {teacher_gib:.2f}, largest module built at once "
            f"{memory['largest_materialised_module_gib']:.2f}; activations not counted) "
            f"-> {student.cfg.train.output_dir}")
    return "\n".join(lines)
