"""A single-process training loop: enough to train a small ViT on a pool and keep its teacher.

Every random choice of step t is seeded from (cfg.seed, t): the images of the step, each
image's crops, the masks and the model's own randomness (drop path), so the same config gives
the same losses.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import torch

from dinoscale.data.augment import MultiCropAugmentation, derive_seed, seeded_generator
from dinoscale.data.collate import collate_data_and_cast
from dinoscale.data.masking import MaskingGenerator
from dinoscale.data.pool import ImagePool
from dinoscale.errors import DataError
from dinoscale.models.loading import save_backbone
from dinoscale.train.metrics import MetricsLogger
from dinoscale.train.optim import apply_schedules, build_optimizer, clip_gradients
from dinoscale.train.ssl import SSLMetaArch
from dinoscale.utils.device import autocast_dtype, default_device
from dinoscale.utils.logging import get_logger

log = get_logger(__name__)

# the key spaces of the per-step generators, so that no two of them share a seed
_ORDER_KEY, _CROPS_KEY, _MASKS_KEY, _MODEL_KEY = range(4)


def build_mask_generator(cfg: Any) -> MaskingGenerator:
    """The iBOT mask generator for the global crops' patch grid (blocks up to half the grid)."""
    side = cfg.crops.global_crops_size // cfg.student.patch_size
    return MaskingGenerator((side, side), max_num_patches=0.5 * side * side,
                            min_num_patches=cfg.ibot.mask_min_num_patches, min_aspect=cfg.ibot.mask_min_aspect)


def pool_indices(pool: ImagePool, seed: int) -> Iterator[int]:
    """Pool indices in a fresh seeded permutation per epoch, forever."""
    for epoch in range(2**62):
        yield from torch.randperm(len(pool), generator=seeded_generator(seed, _ORDER_KEY, epoch)).tolist()


def ssl_batches(cfg: Any, pool: ImagePool, batch_size: int) -> Iterator[dict[str, Any]]:
    """Collated SSL batches; images the pool cannot decode are skipped."""
    if len(pool) == 0:
        raise DataError("the training pool holds no images; check train.dataset_path")
    augment = MultiCropAugmentation.from_config(cfg)
    mask_generator = build_mask_generator(cfg)
    indices = pool_indices(pool, cfg.seed)
    for step in range(2**62):
        samples, skipped = [], 0
        while len(samples) < batch_size:
            image = pool.load(next(indices))
            if image is None:
                skipped += 1
                if skipped > 10 * len(pool):
                    raise DataError("no image of the training pool can be decoded")
                continue
            samples.append(augment(image, seeded_generator(cfg.seed, _CROPS_KEY, step, len(samples))))
        yield collate_data_and_cast(samples, cfg.ibot.mask_ratio_min_max, cfg.ibot.mask_sample_probability,
                                    mask_generator, seeded_generator(cfg.seed, _MASKS_KEY, step))


def train_simple(cfg: Any, pool: ImagePool, steps: int | None = None, output_dir: str | Path | None = None,
                 device: torch.device | None = None) -> tuple[SSLMetaArch, list[dict[str, float]]]:
    """Train for `steps` iterations (default: train.max_iterations, else the full schedule) with
    batches of train.batch_size_per_gpu; returns the model and one metrics dict per step.

    With `output_dir`, the teacher backbone is saved there as teacher_backbone.pth (loadable with
    `dinoscale.models.loading.load_backbone`) and the metrics as metrics.jsonl.
    """
    device = device or default_device()
    batch_size = cfg.train.batch_size_per_gpu
    torch.manual_seed(cfg.seed)
    model = SSLMetaArch(cfg, global_batch_size=batch_size).to(device)
    optimizer = build_optimizer(model.student, cfg)
    compute_dtype = autocast_dtype(device, cfg.train.mixed_precision)
    steps = steps or cfg.train.max_iterations or model.schedules.total_iterations
    batches = ssl_batches(cfg, pool, batch_size)
    logger = MetricsLogger(output_dir) if output_dir is not None else None
    metrics_list = []
    for iteration in range(steps):
        start = time.perf_counter()
        batch = next(batches)
        scheduled = apply_schedules(optimizer, model.schedules, iteration)
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(derive_seed(cfg.seed, _MODEL_KEY, iteration))  # drop path
        with torch.autocast(device.type, dtype=compute_dtype or torch.bfloat16, enabled=compute_dtype is not None):
            _, metrics = model.forward_backward(batch, iteration)
        norms = clip_gradients(model.student, cfg.optim.clip_grad)
        metrics.update({f"grad_norm_{name}": norm for name, norm in norms.items()})
        optimizer.step()
        momentum = model.schedules.teacher_momentum(iteration)
        model.update_teacher(momentum)
        metrics.update(scheduled, iteration=iteration, teacher_momentum=momentum,
                       images_per_s=batch_size / (time.perf_counter() - start))
        metrics_list.append(metrics)
        if logger is not None:
            logger.log(metrics)
        if iteration % cfg.train.log_period_iterations == 0 or iteration == steps - 1:
            log.info("it %d/%d loss %.4f (%.1f img/s)", iteration, steps, metrics["total_loss"],
                     metrics["images_per_s"])
    if logger is not None:
        logger.close()
        save_backbone(model.teacher.backbone, Path(output_dir) / "teacher_backbone.pth")
    return model, metrics_list
