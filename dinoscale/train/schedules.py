"""Training schedules as pure functions of the iteration (a resumed run needs no scheduler state).

Lengths in the config are epochs of `train.OFFICIAL_EPOCH_LENGTH` iterations, as in the reference;
with `train.iterations` set, an epoch is `train.iterations / optim.epochs` iterations instead, so
every warm-up, freeze and decay keeps its share of a run of that many iterations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dinoscale.config import Config
from dinoscale.errors import ConfigError


def warmup_cosine(iteration: int, *, peak: float, final: float, total_iterations: int,
                  warmup_iterations: int = 0, start: float = 0.0) -> float:
    """Linear `start` -> `peak` over the warm-up, then a half cosine reaching `final` at the last
    iteration (total_iterations - 1); `final` from then on."""
    if iteration < warmup_iterations:
        return start + (peak - start) * iteration / warmup_iterations
    last = total_iterations - 1
    if iteration >= last:
        return final
    progress = (iteration - warmup_iterations) / (last - warmup_iterations)
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))


def warmup_constant(iteration: int, *, peak: float, warmup_iterations: int = 0, start: float = 0.0) -> float:
    """Linear `start` -> `peak` over the warm-up, then constant (DINOv3)."""
    if iteration < warmup_iterations:
        return start + (peak - start) * iteration / warmup_iterations
    return peak


def scaled_lr(base_lr: float, global_batch_size: int, scaling_rule: str) -> float:
    """The reference's batch-size scaling of the learning rate."""
    if scaling_rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch_size / 1024.0)
    if scaling_rule == "linear_wrt_256":
        return base_lr * global_batch_size / 256.0
    if scaling_rule == "none":
        return base_lr
    raise ConfigError(f"optim.scaling_rule = {scaling_rule!r} is not one of sqrt_wrt_1024, linear_wrt_256, none")


@dataclass(frozen=True)
class Schedules:
    """Every per-iteration value of a run; `cfg`-independent once built."""

    peak_lr: float
    min_lr: float
    total_iterations: int
    warmup_iterations: int
    constant_after_warmup: bool
    weight_decay: float
    weight_decay_end: float
    freeze_last_layer_iterations: int
    momentum_teacher: float
    final_momentum_teacher: float
    warmup_teacher_temp: float
    teacher_temp: float
    warmup_teacher_temp_iterations: int

    def lr(self, iteration: int) -> float:
        if self.constant_after_warmup:
            return warmup_constant(iteration, peak=self.peak_lr, warmup_iterations=self.warmup_iterations)
        return warmup_cosine(iteration, peak=self.peak_lr, final=self.min_lr, total_iterations=self.total_iterations,
                             warmup_iterations=self.warmup_iterations)

    def last_layer_lr(self, iteration: int) -> float:
        """The prototype layers' learning rate: 0 while they are frozen, else `lr`."""
        return 0.0 if iteration < self.freeze_last_layer_iterations else self.lr(iteration)

    def weight_decay_at(self, iteration: int) -> float:
        if self.constant_after_warmup:
            return self.weight_decay
        return warmup_cosine(iteration, peak=self.weight_decay, final=self.weight_decay_end,
                             total_iterations=self.total_iterations)

    def teacher_momentum(self, iteration: int) -> float:
        if self.constant_after_warmup:
            return self.momentum_teacher
        return warmup_cosine(iteration, peak=self.momentum_teacher, final=self.final_momentum_teacher,
                             total_iterations=self.total_iterations)

    def teacher_temperature(self, iteration: int) -> float:
        return warmup_constant(iteration, peak=self.teacher_temp, start=self.warmup_teacher_temp,
                               warmup_iterations=self.warmup_teacher_temp_iterations)


def iterations_per_epoch(cfg: Config) -> float:
    """Iterations in one epoch of the config's lengths: `train.iterations / optim.epochs` when the run
    length is given in iterations, else `train.OFFICIAL_EPOCH_LENGTH`."""
    if cfg.train.iterations:
        return cfg.train.iterations / cfg.optim.epochs
    return cfg.train.OFFICIAL_EPOCH_LENGTH


def schedule_iterations(cfg: Config) -> int:
    """Iterations from the first step to the end of the schedules (the run length without train.max_iterations)."""
    return cfg.train.iterations or cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH


def schedule_warnings(schedules: Schedules, run_iterations: int) -> list[str]:
    """What in the schedules does not fit a run of `run_iterations` iterations: a warm-up or the
    last-layer freeze covering more than half of it, or a run that stops before its schedule ends."""
    problems = []
    half_run = [("optim.warmup_epochs", "the learning-rate warm-up", schedules.warmup_iterations),
                ("optim.freeze_last_layer_epochs", "the last-layer freeze", schedules.freeze_last_layer_iterations)]
    if schedules.warmup_teacher_temp != schedules.teacher_temp:
        half_run.append(("teacher.warmup_teacher_temp_epochs", "the teacher-temperature warm-up",
                         schedules.warmup_teacher_temp_iterations))
    for key, what, iterations in half_run:
        if iterations > run_iterations / 2:
            problems.append(f"{what} ({key}) lasts {iterations} of the run's {run_iterations} iterations, more than "
                            "half of it; shorten it, or give the run length as train.iterations so that every "
                            "length in epochs is scaled to the run")
    if run_iterations < schedules.total_iterations:
        ending = ""
        if not schedules.constant_after_warmup:
            ending = (f": the learning rate is still {schedules.lr(run_iterations - 1):.3g} at the last step, not "
                      f"its floor optim.min_lr = {schedules.min_lr:.3g}")
        problems.append(f"train.max_iterations stops the run after {run_iterations} of its schedule's "
                        f"{schedules.total_iterations} iterations{ending}; set train.iterations={run_iterations} "
                        "to fit the schedule to the run")
    return problems


def build_schedules(cfg: Config, global_batch_size: int) -> Schedules:
    """Schedules of a dinoscale config for `global_batch_size` images per step (all ranks).

    The peak lr is `optim.lr` when set, else `optim.base_lr` scaled by `optim.scaling_rule`.
    `optim.schedule = constant_after_warmup` keeps lr, weight decay and teacher momentum constant
    after the warm-up (DINOv3); `cosine` decays them (DINOv2).
    """
    epoch = iterations_per_epoch(cfg)
    optim, teacher = cfg.optim, cfg.teacher
    peak_lr = optim.lr or scaled_lr(optim.base_lr, global_batch_size, optim.scaling_rule)
    return Schedules(
        peak_lr=peak_lr,
        min_lr=optim.min_lr,
        total_iterations=schedule_iterations(cfg),
        warmup_iterations=round(optim.warmup_epochs * epoch),
        constant_after_warmup=optim.schedule == "constant_after_warmup",
        weight_decay=optim.weight_decay,
        weight_decay_end=optim.weight_decay_end,
        freeze_last_layer_iterations=round(optim.freeze_last_layer_epochs * epoch),
        momentum_teacher=teacher.momentum_teacher,
        final_momentum_teacher=teacher.final_momentum_teacher,
        warmup_teacher_temp=teacher.warmup_teacher_temp,
        teacher_temp=teacher.teacher_temp,
        warmup_teacher_temp_iterations=round(teacher.warmup_teacher_temp_epochs * epoch),
    )
