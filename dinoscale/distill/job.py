"""The distillation job: `dinoscale distill CONFIG [overrides]`, alone, under torchrun or on SLURM.

Every rank loads its share of the global batch and runs the frozen teacher on it (FSDP2 over all
ranks); the crops, masks and teacher targets are shared out (`BatchRouting`) so that each student,
on its own group of ranks with its own FSDP2 mesh, optimizer and EMA, trains on the whole global
batch. Each student is a training run of its own under `train.output_dir/NAME` (config, metrics,
DCP checkpoints, export): all students checkpoint at the same iterations and a restarted job
resumes every student from the latest iteration all of them saved. At the end each student's EMA
backbone is exported in the official key layout (`NAME/export/student.pth`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.device_mesh import DeviceMesh

from dinoscale.data.augment import derive_seed
from dinoscale.data.stream import build_stream, make_loader
from dinoscale.distill.exchange import BatchRouting
from dinoscale.distill.plan import DistillPlan, make_plan
from dinoscale.distill.step import student_step
from dinoscale.distill.teacher import FrozenTeacher
from dinoscale.distributed import DistInfo, barrier, process_group
from dinoscale.train.build import build_model
from dinoscale.train.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from dinoscale.models.loading import save_backbone
from dinoscale.train.export import gathered_teacher_weights, training_record
from dinoscale.train.metrics import MetricsLogger
from dinoscale.train.schedules import build_schedules
from dinoscale.train.trainer import total_iterations
from dinoscale.utils.device import autocast_dtype
from dinoscale.utils.io import write_text
from dinoscale.utils.logging import get_logger
from dinoscale.utils.preemption import PreemptionGuard

log = get_logger(__name__)

EXPORT_NAME = "export/student.pth"
_MODEL_RNG_KEY = 3


class DistillJob:
    """This rank's part of the job: the teacher shard, its student's shard, optimizer and schedules."""

    def __init__(self, cfg: DictConfig, dist_info: DistInfo):
        self.cfg, self.info = cfg, dist_info
        self.plan: DistillPlan = make_plan(cfg, dist_info.world_size)  # every check, before any work
        # new_group is collective: every rank creates every group, in the same order
        groups = [dist.new_group(list(s.ranks)) for s in self.plan.students]
        index, self.student = self.plan.student_of(dist_info.rank)
        self.group = groups[index]
        self.group_rank = dist.get_rank(self.group)
        self.run_dir = Path(self.student.cfg.train.output_dir)
        if self.group_rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(self.student.cfg))
        compute_dtype = autocast_dtype(dist_info.device, cfg.train.mixed_precision)
        self.autocast = torch.autocast(dist_info.device.type, dtype=compute_dtype or torch.bfloat16,
                                       enabled=compute_dtype is not None)
        self.teacher = FrozenTeacher(cfg.distill.teacher, self.plan.teacher_cfg, dist_info.device,
                                     dist_info.world_size, compute_dtype or torch.float32)
        mesh = DeviceMesh.from_group(self.group, dist_info.device.type)
        self.model, self.optimizer = build_model(self.student.cfg, dist_info.device, len(self.student.ranks), mesh)
        self.schedules = build_schedules(self.student.cfg, self.plan.global_batch)
        self.routing = BatchRouting(self.plan, dist_info.rank)
        self.n_iterations = total_iterations(cfg)

    def resume(self) -> int:
        """Load every student's checkpoint of the latest iteration all students saved; the next iteration."""
        saved = [{int(p.name.split("_")[1]): p for p in checkpoint_dirs(Path(self.cfg.train.output_dir) / s.name)}
                 for s in self.plan.students]
        common = set.intersection(*(set(s) for s in saved))
        if not common:
            return 0
        iteration = max(common)
        mine = saved[self.plan.students.index(self.student)][iteration]
        load_checkpoint(mine, self.model, self.optimizer, self.group)
        log.info("resumed %s from %s", self.student.name, mine)
        return iteration + 1

    def batches(self, start: int):
        stream = build_stream(self.plan.stream_cfg(self.cfg), self.info.rank, self.info.world_size, start)
        return iter(make_loader(stream, self.cfg.train.num_workers))

    def step(self, batch: dict, iteration: int) -> dict[str, float]:
        """Teacher targets on this rank's images, shared out, one step of this rank's student."""
        batch = {k: v.to(self.info.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        teacher_temp = self.schedules.teacher_temperature(iteration)
        with self.autocast:
            cls_targets, patch_targets = self.teacher.targets(batch["collated_global_crops"],
                                                              batch["mask_indices_list"], teacher_temp)
        mine = self.routing.student_batch(batch, cls_targets, patch_targets)
        seed = derive_seed(self.cfg.seed, _MODEL_RNG_KEY, iteration, self.group_rank)
        metrics = student_step(self.model, self.optimizer, self.schedules, mine, iteration,
                               clip_grad=self.student.cfg.optim.clip_grad, autocast=self.autocast, seed=seed,
                               group=self.group)
        metrics["teacher_temp"] = teacher_temp
        return metrics

    def save(self, iteration: int) -> None:
        save_checkpoint(self.run_dir, iteration, self.model, self.optimizer,
                        {"global_batch": self.plan.global_batch, "student": self.student.name},
                        self.cfg.train.keep_last_checkpoints, self.group)

    def export(self) -> Path:
        """The student's EMA backbone in the official key layout, written by the group's first rank."""
        path = self.run_dir / EXPORT_NAME
        # gathered on every rank of the group: torch's cpu_offload gathers onto global rank 0 only
        full = gathered_teacher_weights(self.model)
        if self.group_rank == 0:
            save_backbone(self.model.teacher.backbone, path, state_dict=full,
                          training=training_record(self.student.cfg.crops))
        return path


def distill(cfg: DictConfig) -> dict[str, Path] | None:
    """Run (or resume) the distillation; returns each student's exported backbone, or None when a
    signal stopped the job before the end (after every student wrote a checkpoint)."""
    with process_group() as dist_info:
        return _distill(cfg, dist_info)


def _distill(cfg: DictConfig, dist_info: DistInfo) -> dict[str, Path] | None:
    job = DistillJob(cfg, dist_info)
    start = job.resume()
    batches = job.batches(start)
    metrics_log = MetricsLogger(job.run_dir, enabled=job.group_rank == 0)
    with PreemptionGuard() as guard:  # SIGTERM / SIGUSR2: every student checkpoints at the end of the step
        for iteration in range(start, job.n_iterations):
            step_start = time.perf_counter()
            metrics = job.step(next(batches), iteration)
            seconds = time.perf_counter() - step_start
            metrics.update(seconds=seconds, images_per_s=job.plan.global_batch / seconds)
            metrics_log.log(metrics)
            if iteration % cfg.train.log_period_iterations == 0 and job.group_rank == 0:
                log.info("%s it %d/%d loss %.4f  %.1f img/s", job.student.name, iteration, job.n_iterations,
                         metrics["total_loss"], metrics["images_per_s"])
            stopping = guard.sync()
            last = iteration == job.n_iterations - 1
            if stopping or last or (iteration + 1) % cfg.train.checkpoint_period_iterations == 0:
                job.save(iteration)
            if stopping:
                metrics_log.close()
                barrier()  # every student's checkpoint is complete
                guard.checkpoint_saved(stopping=True)
                return None
    metrics_log.close()
    job.export()
    exports = [None] * dist_info.world_size
    dist.all_gather_object(exports, (job.student.name, str(job.run_dir / EXPORT_NAME)))
    barrier()
    return {name: Path(path) for name, path in dict(exports).items()}
