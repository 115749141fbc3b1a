"""The scalable trainer: `dinoscale train CONFIG [overrides]`, alone, under torchrun or on SLURM.

One loop for every scale: FSDP2 shards the student, the EMA teacher and the Gram teacher over
the ranks (a single process is a world of one, sharded the same way, so it computes in the same
precision); bf16 compute with fp32 master weights and residual stream where the hardware has it;
a deterministic batch stream; DCP checkpoints every N iterations and on SIGTERM/SIGUSR2; JSONL
metrics with images/s and MFU, the EMA teacher's k-NN accuracy every
eval.online_knn_period_iterations and its dense-probe scores every
eval.online_dense_period_iterations; a NaN/inf guard that names the term and keeps the last good
checkpoint; and the teacher backbone exported at the end.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dinoscale.data.augment import MultiCropAugmentation, derive_seed
from dinoscale.data.collate import collate_data_and_cast
from dinoscale.data.masking import MaskingGenerator
from dinoscale.data.pool import open_pool
from dinoscale.data.stream import BatchStream, Source, make_loader
from dinoscale.errors import ConfigError, DinoscaleError
from dinoscale.eval.dense import online_dense
from dinoscale.eval.dense_data import open_dense_datasets
from dinoscale.eval.evaluate import online_knn, open_labelled
from dinoscale.eval.features import LabelledImages
from dinoscale.eval.resolution import at_training_resolution
from dinoscale.models.loading import load_backbone, meta_backbone, save_backbone
from dinoscale.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dinoscale.train.distributed import DistInfo, barrier, process_group
from dinoscale.train.export import training_record
from dinoscale.train.metrics import (MetricsLogger, backbone_forward_flops, head_forward_flops, measure_matmul_peak,
                                     peak_memory_mb)
from dinoscale.train.optim import apply_schedules, build_optimizer, clip_gradients
from dinoscale.train.parallel import parallelize
from dinoscale.train.schedules import schedule_iterations, schedule_warnings
from dinoscale.train.ssl import SSLMetaArch
from dinoscale.train.throughput import ThroughputWindow
from dinoscale.utils.device import autocast_dtype
from dinoscale.utils.io import write_text
from dinoscale.utils.logging import get_logger
from dinoscale.utils.preemption import PreemptionGuard

log = get_logger(__name__)

EXPORT_NAME = "export/teacher.pth"
_MODEL_RNG_KEY = 3


class NonFiniteLossError(DinoscaleError):
    """A loss term became NaN or inf."""


def _mean_across_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Every value averaged over the ranks (one collective); a non-finite value on any rank stays non-finite."""
    if not dist.is_initialized():
        return metrics
    names = sorted(metrics)
    values = torch.tensor([metrics[n] for n in names], dtype=torch.float64)
    dist.all_reduce(values)
    return dict(zip(names, (values / dist.get_world_size()).tolist()))


def training_sources(cfg: DictConfig) -> list[Source]:
    if cfg.train.sources:
        return [Source(open_pool(s.path), s.weight) for s in cfg.train.sources]
    if not cfg.train.dataset_path:
        raise ConfigError("no training data: set train.dataset_path (or train.sources)")
    return [Source(open_pool(cfg.train.dataset_path))]


def build_stream(cfg: DictConfig, dist_info: DistInfo, start_step: int) -> BatchStream:
    augment = MultiCropAugmentation.from_config(cfg)
    mask_generator = MaskingGenerator.from_config(cfg)

    def collate(samples: list, generator: torch.Generator) -> dict:
        return collate_data_and_cast(samples, cfg.ibot.mask_ratio_min_max, cfg.ibot.mask_sample_probability,
                                     mask_generator, generator, rank=dist_info.rank,
                                     world_size=dist_info.world_size)

    return BatchStream(training_sources(cfg), cfg.train.batch_size_per_gpu, dist_info.rank, dist_info.world_size,
                       cfg.seed, start_step, augment, collate, cfg.train.homogeneous_batch_fraction)


def total_iterations(cfg: DictConfig) -> int:
    full = schedule_iterations(cfg)
    return min(full, cfg.train.max_iterations) if cfg.train.max_iterations else full


def step_flops(model: SSLMetaArch, batch: dict) -> float:
    """Matmul FLOPs of one training step on this rank: student forward+backward (3x forward) on
    all crops, teacher (and Gram teacher) forward on the global crops."""
    backbone = model.student.backbone
    patch = backbone.patch_size
    extra_tokens = 1 + backbone.n_storage_tokens

    def crops_flops(crops: torch.Tensor) -> float:
        if crops.numel() == 0:
            return 0.0
        tokens = (crops.shape[-2] // patch) * (crops.shape[-1] // patch) + extra_tokens
        return backbone_forward_flops(backbone, crops.shape[0], tokens)

    global_crops, local_crops = batch["collated_global_crops"], batch["collated_local_crops"]
    n_cls = global_crops.shape[0] + local_crops.shape[0]
    n_masked = int(batch["mask_indices_list"].numel())
    student = crops_flops(global_crops) + crops_flops(local_crops)
    student += sum(head_forward_flops(m, n_cls if n == "dino_head" else n_masked)
                   for n, m in model.student.items() if n != "backbone")
    teacher = crops_flops(global_crops) + head_forward_flops(model.teacher.dino_head, global_crops.shape[0])
    if model.gram_teacher is not None:
        teacher += crops_flops(batch.get("collated_gram_teacher_crops", global_crops))
    return 3 * student + teacher


def _non_finite_terms(metrics: dict[str, float]) -> list[str]:
    return [name for name, value in metrics.items() if name.endswith("loss") and not math.isfinite(value)]


def _raise_non_finite(terms: list[str], iteration: int, run_dir: Path) -> None:
    last = latest_checkpoint(run_dir)
    keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    raise NonFiniteLossError(f"{', '.join(terms)} became non-finite at iteration {iteration}; {keep}. "
                             "Lower optim.base_lr, raise optim.warmup_epochs or check the data.")


def _load_pretrained(model: SSLMetaArch, path: str) -> None:
    """Continued pretraining: official DINOv2/DINOv3 (or exported) backbone weights, fresh heads."""
    pretrained = load_backbone(path, arch=model.student.backbone.spec)
    for branch in (model.student, model.teacher, model.gram_teacher):
        if branch is not None:
            branch.backbone.load_state_dict(pretrained.state_dict(), strict=True)
    log.info("initialised student and teachers from %s", path)


def _gathered_teacher_weights(model: SSLMetaArch, cpu_offload: bool = False) -> dict[str, torch.Tensor]:
    """The teacher backbone's whole state dict on every rank (a collective under FSDP)."""
    return get_model_state_dict(model.teacher.backbone,
                                options=StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload))


def export_teacher(model: SSLMetaArch, path: Path, is_main: bool) -> None:
    """Gather the teacher backbone and write it in the official layout, with its training record."""
    full = _gathered_teacher_weights(model, cpu_offload=True)
    if is_main:
        save_backbone(model.teacher.backbone, path, state_dict=full, training=training_record(model.cfg))


def plain_teacher_backbone(model: SSLMetaArch) -> torch.nn.Module:
    """The EMA teacher's backbone gathered whole into a plain copy on every rank (a collective), for
    the online evaluations, whose feature extraction shares the images out over the ranks."""
    backbone = meta_backbone(model.teacher.backbone.spec)
    backbone.load_state_dict(_gathered_teacher_weights(model), assign=True)
    return backbone


def teacher_knn(model: SSLMetaArch, labelled: tuple[LabelledImages, LabelledImages], cfg: DictConfig,
                device: torch.device) -> dict[str, float]:
    """k-NN metrics of the EMA teacher's backbone on the labelled eval sets."""
    return online_knn(plain_teacher_backbone(model), *labelled, at_training_resolution(cfg), device)


def train_step(model: SSLMetaArch, optimizer: torch.optim.Optimizer, batch: dict, iteration: int, cfg: DictConfig,
               autocast: torch.autocast, rank: int, run_dir: Path) -> dict[str, float]:
    """One iteration on this rank's batch: scheduled lr and weight decay, forward and backward under
    `autocast`, the loss metrics averaged over ranks (a non-finite term raises before the weights
    change), gradient clipping, AdamW and the EMA teacher update. Returns the step's metrics."""
    scheduled = apply_schedules(optimizer, model.schedules, iteration)
    optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(derive_seed(cfg.seed, _MODEL_RNG_KEY, iteration, rank))  # drop path
    with autocast:
        _, metrics = model.forward_backward(batch, iteration)
    metrics = _mean_across_ranks(metrics)
    bad_terms = _non_finite_terms(metrics)
    if bad_terms:
        _raise_non_finite(bad_terms, iteration, run_dir)
    norms = clip_gradients(model.student, cfg.optim.clip_grad)
    optimizer.step()
    momentum = model.schedules.teacher_momentum(iteration)
    model.update_teacher(momentum)
    metrics.update(scheduled, iteration=iteration, teacher_momentum=momentum,
                   **{f"grad_norm_{name}": value for name, value in norms.items()})
    return metrics


def build_model(cfg: DictConfig, dist_info: DistInfo) -> tuple[SSLMetaArch, torch.optim.AdamW]:
    """The SSL model on this rank's device, its pretrained weights loaded, sharded over the process
    group (compute dtype, activation checkpointing and compile as configured), and its optimizer."""
    torch.manual_seed(cfg.seed)
    compute_dtype = autocast_dtype(dist_info.device, cfg.train.mixed_precision)
    model = SSLMetaArch(cfg, cfg.train.batch_size_per_gpu * dist_info.world_size).to(dist_info.device)
    if cfg.student.pretrained_weights:
        _load_pretrained(model, cfg.student.pretrained_weights)
    branches = [b for b in (model.student, model.teacher, model.gram_teacher) if b is not None]
    parallelize(branches, dist_info.device, dist_info.world_size, compute_dtype or torch.float32,
                cfg.train.activation_checkpointing, cfg.train.compile, checkpointed=[model.student])
    return model, build_optimizer(model.student, cfg)


def train(cfg: DictConfig) -> Path | None:
    """Train (or resume) the run in cfg.train.output_dir; returns the exported teacher's path,
    or None when a signal stopped the run before the end (after writing a checkpoint)."""
    with process_group() as dist_info:
        return _train(cfg, dist_info)


def _train(cfg: DictConfig, dist_info: DistInfo) -> Path | None:
    run_dir = Path(cfg.train.output_dir)
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    compute_dtype = autocast_dtype(dist_info.device, cfg.train.mixed_precision)
    global_batch = cfg.train.batch_size_per_gpu * dist_info.world_size
    model, optimizer = build_model(cfg, dist_info)

    start = 0
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        meta = load_checkpoint(checkpoint, model, optimizer)
        start = meta["iteration"] + 1
        log.info("resumed from %s at iteration %d", checkpoint, start)

    n_iterations = total_iterations(cfg)
    if dist_info.is_main:
        for problem in schedule_warnings(model.schedules, n_iterations):
            log.warning(problem)
    metrics_log = MetricsLogger(run_dir, enabled=dist_info.is_main)
    peak_flops = cfg.train.peak_flops or measure_matmul_peak(dist_info.device, compute_dtype or torch.float32)
    batches = iter(make_loader(build_stream(cfg, dist_info, start), cfg.train.num_workers))
    autocast = torch.autocast(dist_info.device.type, dtype=compute_dtype or torch.bfloat16,
                              enabled=compute_dtype is not None)
    knn_period = cfg.eval.online_knn_period_iterations
    speed = ThroughputWindow(cfg.train.log_period_iterations)
    labelled = (open_labelled(cfg.eval.train_dataset, "train"),
                open_labelled(cfg.eval.val_dataset, "val")) if knn_period else None
    dense_period = cfg.eval.online_dense_period_iterations
    dense_sets = open_dense_datasets(cfg.eval.dense) if dense_period else None

    with PreemptionGuard() as guard:  # SIGTERM / SIGUSR2: checkpoint at the end of the step, then stop
        for iteration in range(start, n_iterations):
            step_start, cpu_start = time.perf_counter(), time.process_time()
            batch = next(batches)
            data_seconds = time.perf_counter() - step_start
            metrics = train_step(model, optimizer, batch, iteration, cfg, autocast, dist_info.rank, run_dir)
            seconds = time.perf_counter() - step_start
            flops = step_flops(model, batch)
            # cpu_seconds / seconds: how many cores the step kept busy (data-loader workers not counted)
            metrics.update(seconds=seconds, data_seconds=data_seconds, cpu_seconds=time.process_time() - cpu_start,
                           images_per_s=global_batch / seconds, peak_flops=peak_flops, mfu=flops / seconds / peak_flops,
                           peak_memory_mb=peak_memory_mb(dist_info.device),
                           **speed.add(global_batch, seconds, data_seconds, flops, peak_flops))
            if knn_period and (iteration + 1) % knn_period == 0:
                metrics.update(teacher_knn(model, labelled, cfg, dist_info.device))
                log.info("it %d: teacher k-NN top-1 %s", iteration,
                         {k: round(v, 2) for k, v in metrics.items() if k.startswith("knn_top1")})
            if dense_period and (iteration + 1) % dense_period == 0:
                dense = online_dense(plain_teacher_backbone(model), dense_sets, cfg.eval, dist_info.device)
                metrics.update(dense)
                log.info("it %d: teacher dense probes %s", iteration, {k: round(v, 3) for k, v in dense.items()})
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
