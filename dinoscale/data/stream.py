"""Deterministic, resumable streams of training batches over one or more image pools.

The batch of step `t` on rank `r` is a pure function of (seed, t, r): which images (an
epoch-wise shuffle of each source), how the sources mix, the crop sizes (with mixed resolution,
one triple for the whole global batch), and every augmentation and mask.
A run resumed at step t therefore sees exactly the data it would have seen, on any number
of data-loader workers. Memory stays bounded: the shuffle permutes blocks of consecutive
items and items inside a block, computed on demand, never a permutation of the whole pool.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dinoscale.data.augment import MultiCropAugmentation, seeded_generator
from dinoscale.data.collate import collate_data_and_cast
from dinoscale.data.crop_sizes import CropSizePlan
from dinoscale.data.masking import MaskingGenerator
from dinoscale.data.pool import ImagePool, open_pool
from dinoscale.errors import ConfigError, DataError

if TYPE_CHECKING:
    from dinoscale.config import Config

SHUFFLE_BLOCK = 4096


class BlockShuffle:
    """Position p of the endless stream -> item index: a fresh shuffle every epoch."""

    def __init__(self, n_items: int, seed: int, block: int = SHUFFLE_BLOCK):
        if n_items <= 0:
            raise DataError("cannot stream from an empty pool")
        self.n_items, self.seed, self.block = n_items, seed, block
        self.n_blocks = -(-n_items // block)
        self._block_order = lru_cache(maxsize=2)(self._block_order_uncached)
        self._in_block = lru_cache(maxsize=64)(self._in_block_uncached)

    def _block_order_uncached(self, epoch: int) -> np.ndarray:
        # full blocks are shuffled; a short last block (if any) stays last so offsets are arithmetic
        full = self.n_items // self.block
        order = np.random.default_rng([self.seed, epoch, 0]).permutation(full)
        return np.append(order, full) if full < self.n_blocks else order

    def _in_block_uncached(self, epoch: int, block: int) -> np.ndarray:
        size = min(self.block, self.n_items - block * self.block)
        return np.random.default_rng([self.seed, epoch, 1, block]).permutation(size)

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(position, self.n_items)
        slot, inner = divmod(offset, self.block)
        block = int(self._block_order(epoch)[slot])
        return block * self.block + int(self._in_block(epoch, block)[inner])


@dataclass
class Source:
    pool: ImagePool
    weight: float = 1.0


def allocate(global_batch: int, weights: Sequence[float]) -> list[int]:
    """Split a batch across sources in proportion to weights (largest remainder), fixed per step."""
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        raise DataError("source weights must not all be zero")
    exact = global_batch * w / w.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: global_batch - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


class BatchStream(IterableDataset):
    """Endless batches for one rank starting at `start_step`; a worker takes every W-th step.

    `make_sample[i](image, generator)` turns an image into a training sample (multi-crop) and
    `collate[i](samples, generator)` stacks them and draws the masks (the generator is seeded alike
    on every rank: it plans for the global batch), one pair per crop-size triple `i`;
    `triple_at(step)` says which triple a step uses (the same on every rank).
    """

    def __init__(self, sources: Sequence[Source], batch_size: int, rank: int, world_size: int, seed: int,
                 start_step: int, make_sample: Sequence[Callable[[Image.Image, torch.Generator], object]],
                 collate: Sequence[Callable[[list, torch.Generator], dict]], homogeneous_batch_fraction: float = 0.0,
                 triple_at: Callable[[int], int] | None = None):
        if len(make_sample) != len(collate):
            raise ValueError("give one make_sample and one collate per crop-size triple")
        self.sources = list(sources)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.start_step = seed, start_step
        self.make_sample, self.collate = list(make_sample), list(collate)
        self.triple_at = triple_at
        self.homogeneous_batch_fraction = homogeneous_batch_fraction
        self.global_batch = batch_size * world_size
        self.mixed_counts = allocate(self.global_batch, [s.weight for s in self.sources])
        self.shuffles = [BlockShuffle(len(s.pool), seed + 7919 * i) for i, s in enumerate(self.sources)]
        self.homogeneous_shuffles = [BlockShuffle(len(s.pool), seed + 7919 * i + 1) for i, s in enumerate(self.sources)]

    def step_items(self, step: int) -> list[tuple[int, int, int]]:
        """(source, item, position in the global batch) for every sample of this rank at `step`."""
        rng = np.random.default_rng([self.seed, step, 2])
        if self.homogeneous_batch_fraction > 0 and rng.random() < self.homogeneous_batch_fraction:
            weights = np.asarray([s.weight for s in self.sources], dtype=np.float64)
            source = int(rng.choice(len(self.sources), p=weights / weights.sum()))
            base = step * self.global_batch
            stream = [(source, self.homogeneous_shuffles[source](base + j)) for j in range(self.global_batch)]
        else:
            stream = []
            for source, count in enumerate(self.mixed_counts):
                base = step * count
                stream += [(source, self.shuffles[source](base + j)) for j in range(count)]
            stream = [stream[j] for j in rng.permutation(len(stream))]  # sources mixed across ranks
        first = self.rank * self.batch_size
        return [(*stream[j], j) for j in range(first, first + self.batch_size)]

    def _load(self, source: int, item: int) -> Image.Image:
        pool = self.sources[source].pool
        for attempt in range(len(pool)):
            image = pool.load((item + attempt) % len(pool))  # a skipped image yields its successor
            if image is not None:
                return image
        raise DataError(f"no readable image in source {source}")

    def batch(self, step: int) -> dict:
        """Every random draw is keyed by the step and the sample's global position, so the
        global batch is the same whatever the number of ranks."""
        triple = self.triple_at(step) if self.triple_at is not None else 0
        make_sample, collate = self.make_sample[triple], self.collate[triple]
        samples = [make_sample(self._load(source, item), seeded_generator(self.seed, step, 1, position))
                   for source, item, position in self.step_items(step)]
        out = collate(samples, seeded_generator(self.seed, step, 2))
        out["step"] = step
        return out

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        step = self.start_step + worker
        while True:
            yield self.batch(step)
            step += n_workers


def make_loader(stream: BatchStream, num_workers: int) -> DataLoader:
    """Workers are visited round-robin, so batches come out in step order."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                      prefetch_factor=2 if num_workers > 0 else None)


def training_sources(cfg: Config) -> list[Source]:
    """The pools of `train.sources` (weighted), else the one of `train.dataset_path`."""
    if cfg.train.sources:
        return [Source(open_pool(s.path), s.weight) for s in cfg.train.sources]
    if not cfg.train.dataset_path:
        raise ConfigError("no training data: set train.dataset_path (or train.sources)")
    return [Source(open_pool(cfg.train.dataset_path))]


def build_stream(cfg: Config, rank: int, world_size: int, start_step: int) -> BatchStream:
    """The training stream of a dinoscale config (its `train`, `crops` and `ibot` sections, the patch
    size and the seed) for one rank, from `start_step` on: one augmentation and one mask generator
    per crop-size triple."""
    patch_size = cfg.student.patch_size
    plan = CropSizePlan.from_config(cfg.crops, patch_size)
    augments = [MultiCropAugmentation(plan.crops_of(cfg.crops, i), patch_size) for i in range(len(plan))]
    collates = [_collate_for(cfg, triple.global_crops_size // patch_size, rank, world_size) for triple in plan.triples]
    return BatchStream(training_sources(cfg), cfg.train.batch_size_per_gpu, rank, world_size, cfg.seed, start_step,
                       augments, collates, cfg.train.homogeneous_batch_fraction,
                       triple_at=functools.partial(plan.index_at, cfg.seed))


def _collate_for(cfg: Config, side: int, rank: int, world_size: int) -> Callable[[list, torch.Generator], dict]:
    """Collate with iBOT masks on a side x side patch grid (the global crops'), in blocks of up to half of it."""
    mask_generator = MaskingGenerator((side, side), max_num_patches=0.5 * side * side,
                                      min_num_patches=cfg.ibot.mask_min_num_patches,
                                      min_aspect=cfg.ibot.mask_min_aspect)

    def collate(samples: list, generator: torch.Generator) -> dict:
        return collate_data_and_cast(samples, cfg.ibot.mask_ratio_min_max, cfg.ibot.mask_sample_probability,
                                     mask_generator, generator, rank=rank, world_size=world_size)

    return collate
