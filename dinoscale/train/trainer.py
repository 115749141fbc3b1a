"""The scalable trainer: `dinoscale train CONFIG [overrides]`, alone, under torchrun or on SLURM.

One loop for every scale: FSDP2 shards the student, the EMA teacher and the Gram teacher over
the ranks (a single process is a world of one, sharded the same way, so it computes in the same
precision); bf16 compute with fp32 master weights and residual stream where the hardware has it;
a deterministic batch stream; DCP checkpoints every N iterations and on SIGTERM/SIGUSR2; JSONL
metrics with images/s and MFU, the EMA teacher's k-NN accuracy every
eval.online_knn_period_iterations and its dense-probe scores every
eval.online_dense_period_iterations; a NaN/inf guard that names the term and keeps the last good
checkpoint; and the teacher backbone exported at the end. The model is built by
`dinoscale.train.build`, the batches by `dinoscale.data.stream`, the export by
`dinoscale.train.export`, the online evaluations by `dinoscale.eval.online`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from dinoscale.data.augment import derive_seed
from dinoscale.data.crop_sizes import CropSizePlan
from dinoscale.data.stream import build_stream, make_loader
from dinoscale.distributed import DistInfo, barrier, process_group
from dinoscale.errors import DinoscaleError
from dinoscale.eval.online import OnlineEvaluation
from dinoscale.eval.resolution import at_training_resolution
from dinoscale.train.build import build_model
from dinoscale.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dinoscale.train.export import EXPORT_NAME, export_teacher, teacher_backbone
from dinoscale.train.metrics import MetricsLogger, measure_matmul_peak, step_flops
from dinoscale.train.optim import apply_schedules, clip_gradients
from dinoscale.train.schedules import Schedules, build_schedules, schedule_iterations, schedule_warnings
from dinoscale.train.ssl import SSLMetaArch
from dinoscale.train.throughput import ThroughputWindow
from dinoscale.utils.device import autocast_dtype
from dinoscale.utils.io import write_text
from dinoscale.utils.logging import get_logger
from dinoscale.utils.machine import peak_memory_mb
from dinoscale.utils.preemption import PreemptionGuard

log = get_logger(__name__)

_MODEL_RNG_KEY = 3


class NonFiniteLossError(DinoscaleError):
    """A loss term became NaN or inf."""


def _mean_across_ranks(metrics: dict[str, float], group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """Every value averaged over the ranks of `group` (default: all; one collective); a non-finite value on
    any rank stays non-finite."""
    if not dist.is_initialized():
        return metrics
    names = sorted(metrics)
    values = torch.tensor([metrics[n] for n in names], dtype=torch.float64)
    dist.all_reduce(values, group=group)
    return dict(zip(names, (values / dist.get_world_size(group)).tolist()))


def crop_sizes_of(batch: dict) -> dict[str, int]:
    """The crop sides of a batch (with mixed resolution, the triple its step drew)."""
    sizes = {"global_crops_size": batch["collated_global_crops"].shape[-1]}
    if batch["collated_local_crops"].numel():
        sizes["local_crops_size"] = batch["collated_local_crops"].shape[-1]
    if "collated_gram_teacher_crops" in batch:
        sizes["gram_teacher_crops_size"] = batch["collated_gram_teacher_crops"].shape[-1]
    return sizes


def total_iterations(cfg: DictConfig) -> int:
    full = schedule_iterations(cfg)
    return min(full, cfg.train.max_iterations) if cfg.train.max_iterations else full


def train_step(model: SSLMetaArch, optimizer: torch.optim.Optimizer, schedules: Schedules, batch: dict,
               iteration: int, *, clip_grad: float, autocast: torch.autocast, seed: int) -> dict[str, float]:
    """One iteration on this rank's batch: scheduled lr and weight decay, forward and backward under
    `autocast` (drop path seeded with `seed`), the loss metrics averaged over ranks (a non-finite
    term raises before the weights change), gradient clipping, AdamW and the EMA teacher update.
    Returns the step's metrics."""
    scheduled = apply_schedules(optimizer, schedules, iteration)
    optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with autocast:
        _, metrics = model.forward_backward(batch, iteration, schedules.teacher_temperature(iteration))
    return finish_step(model, optimizer, schedules, metrics, scheduled, iteration, clip_grad)


def finish_step(model: SSLMetaArch, optimizer: torch.optim.Optimizer, schedules: Schedules, metrics: dict[str, float],
                scheduled: dict[str, float], iteration: int, clip_grad: float,
                group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """After the backward pass: the metrics averaged over the ranks of `group` (a non-finite loss term
    raises before the weights change), gradient clipping, AdamW and the EMA update. Returns the
    step's metrics with the scheduled values and gradient norms."""
    metrics = _mean_across_ranks(metrics, group)
    bad_terms = [name for name, value in metrics.items() if name.endswith("loss") and not math.isfinite(value)]
    if bad_terms:
        raise NonFiniteLossError(f"{', '.join(bad_terms)} became non-finite at iteration {iteration}")
    norms = clip_gradients(model.student, clip_grad)
    optimizer.step()
    momentum = schedules.teacher_momentum(iteration)
    model.update_teacher(momentum)
    metrics.update(scheduled, iteration=iteration, teacher_momentum=momentum,
                   **{f"grad_norm_{name}": value for name, value in norms.items()})
    return metrics


def train(cfg: DictConfig) -> Path | None:
    """Train (or resume) the run in cfg.train.output_dir; returns the exported teacher's path,
    or None when a signal stopped the run before the end (after writing a checkpoint)."""
    CropSizePlan.from_config(cfg.crops, cfg.student.patch_size)  # bad crop sizes stop the run before any work
    with process_group() as dist_info:
        return _train(cfg, dist_info)


def _train(cfg: DictConfig, dist_info: DistInfo) -> Path | None:
    run_dir = Path(cfg.train.output_dir)
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    compute_dtype = autocast_dtype(dist_info.device, cfg.train.mixed_precision)
    global_batch = cfg.train.batch_size_per_gpu * dist_info.world_size
    model, optimizer = build_model(cfg, dist_info.device, dist_info.world_size)
    schedules = build_schedules(cfg, global_batch)

    start = 0
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        meta = load_checkpoint(checkpoint, model, optimizer)
        start = meta["iteration"] + 1
        log.info("resumed from %s at iteration %d", checkpoint, start)

    n_iterations = total_iterations(cfg)
    if dist_info.is_main:
        for problem in schedule_warnings(schedules, n_iterations):
            log.warning(problem)
    metrics_log = MetricsLogger(run_dir, enabled=dist_info.is_main)
    peak_flops = cfg.train.peak_flops or measure_matmul_peak(dist_info.device, compute_dtype or torch.float32)
    batches = iter(make_loader(build_stream(cfg, dist_info.rank, dist_info.world_size, start),
                               cfg.train.num_workers))
    autocast = torch.autocast(dist_info.device.type, dtype=compute_dtype or torch.bfloat16,
                              enabled=compute_dtype is not None)
    online_eval = OnlineEvaluation(at_training_resolution(cfg.eval, cfg.crops), dist_info.device)
    speed = ThroughputWindow(cfg.train.log_period_iterations)

    with PreemptionGuard() as guard:  # SIGTERM / SIGUSR2: checkpoint at the end of the step, then stop
        for iteration in range(start, n_iterations):
            step_start, cpu_start = time.perf_counter(), time.process_time()
            batch = next(batches)
            data_seconds = time.perf_counter() - step_start
            try:
                metrics = train_step(model, optimizer, schedules, batch, iteration, clip_grad=cfg.optim.clip_grad,
                                     autocast=autocast,
                                     seed=derive_seed(cfg.seed, _MODEL_RNG_KEY, iteration, dist_info.rank))
            except NonFiniteLossError as err:
                last = latest_checkpoint(run_dir)
                keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
                raise NonFiniteLossError(f"{err}; {keep}. Lower optim.base_lr, raise optim.warmup_epochs or "
                                         "check the data.") from None
            seconds = time.perf_counter() - step_start
            flops = step_flops(model, batch)
            # cpu_seconds / seconds: how many cores the step kept busy (data-loader workers not counted)
            metrics.update(seconds=seconds, data_seconds=data_seconds, cpu_seconds=time.process_time() - cpu_start,
                           images_per_s=global_batch / seconds, peak_flops=peak_flops, mfu=flops / seconds / peak_flops,
                           peak_memory_mb=peak_memory_mb(dist_info.device), **crop_sizes_of(batch),
                           **speed.add(global_batch, seconds, data_seconds, flops, peak_flops))
            if online_eval.due(iteration):
                metrics.update(online_eval(teacher_backbone(model), iteration))
            metrics_log.log(metrics)
            if iteration % cfg.train.log_period_iterations == 0:
                log.info("it %d/%d loss %.4f  %.1f img/s  mfu %.1f%%  data wait %.0f%% (last %d it)", iteration,
                         n_iterations, metrics["total_loss"], metrics["images_per_s_window"],
                         100 * metrics["mfu_window"], 100 * metrics["data_wait_share_window"],
                         metrics["window_iterations"])

            stopping = guard.sync()
            last = iteration == n_iterations - 1
            if stopping or last or (iteration + 1) % cfg.train.checkpoint_period_iterations == 0:
                save_checkpoint(run_dir, iteration, model, optimizer, {"global_batch": global_batch},
                                cfg.train.keep_last_checkpoints)
            if stopping:
                log.info("stop requested: checkpoint at iteration %d written", iteration)
                metrics_log.close()
                guard.checkpoint_saved(stopping=True)  # under submitit, after USR2: requeue
                return None

    metrics_log.close()
    export_teacher(model, run_dir / EXPORT_NAME, dist_info.is_main)
    barrier()  # the export is written before any rank tears the process group down
    return run_dir / EXPORT_NAME
