"""Mixed-resolution crops (DINOv3's high-resolution recipe): the (global, local, Gram-teacher) crop-size
triples of the `crops` section, their probabilities, and the triple each training step uses.

`crops.global_crops_size`, `crops.local_crops_size` and `crops.gram_teacher_crops_size` are each one
size or a list with one entry per triple; a single size (or null for the Gram teacher) stands for every
triple. `crops.global_local_crop_pairs_ratios` is the probability of each triple. The reference draws
one data loader per step with a generator that lives in the loader; here the triple of step t is a
function of (seed, t) alone, drawn for the whole global batch, so every rank uses the same one, on any
number of ranks, and a resumed run uses what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from dinoscale.data.config import CropsConfig
from dinoscale.errors import ConfigError

SIZE_KEYS = ("global_crops_size", "local_crops_size", "gram_teacher_crops_size")
RATIOS_KEY = "global_local_crop_pairs_ratios"
_CROP_SIZE_RNG_KEY = 3  # the stream's other per-step draws use keys 0-2 (dinoscale.data.stream)


@dataclass(frozen=True)
class CropSizes:
    """One triple: the side in pixels of the global, local and Gram-teacher crops (None: no Gram crops)."""

    global_crops_size: int
    local_crops_size: int
    gram_teacher_crops_size: int | None


@dataclass(frozen=True)
class CropSizePlan:
    """The crop-size triples of a run and the probability of each."""

    triples: tuple[CropSizes, ...]
    ratios: tuple[float, ...]

    @classmethod
    def from_config(cls, crops: CropsConfig | DictConfig, patch_size: int) -> "CropSizePlan":
        """The checked triples of a `crops` section: lists of one length, ratios that match it and sum
        to 1, every size a positive multiple of `patch_size`. Raises ConfigError naming the key."""
        columns = {key: _as_list(getattr(crops, key)) for key in SIZE_KEYS}
        lengths = {key: len(values) for key, values in columns.items() if len(values) > 1}
        n_triples = max(lengths.values(), default=1)
        if len(set(lengths.values())) > 1:
            described = ", ".join(f"crops.{key} has {n}" for key, n in lengths.items())
            raise ConfigError(f"crop-size lists of unequal length ({described} entries); give one size per "
                              "(global, local, Gram-teacher) triple, or a single size for all triples")
        for key, values in columns.items():
            if len(values) == 1:
                columns[key] = values * n_triples
            for value in columns[key]:
                _check_size(key, value, patch_size)
        triples = tuple(CropSizes(*sizes) for sizes in zip(*(columns[key] for key in SIZE_KEYS)))
        return cls(triples, _checked_ratios(getattr(crops, RATIOS_KEY), n_triples))

    def __len__(self) -> int:
        return len(self.triples)

    def index_at(self, seed: int, step: int) -> int:
        """Which triple step `step` uses (a pure function of seed and step; no draw for a single triple)."""
        if len(self.triples) == 1:
            return 0
        rng = np.random.default_rng([seed, step, _CROP_SIZE_RNG_KEY])
        return int(rng.choice(len(self.triples), p=self.ratios))

    def at(self, seed: int, step: int) -> CropSizes:
        return self.triples[self.index_at(seed, step)]

    def crops_of(self, crops: CropsConfig | DictConfig, index: int) -> CropsConfig:
        """The `crops` section with the sizes of triple `index` (what one MultiCropAugmentation takes)."""
        section = OmegaConf.to_object(crops) if isinstance(crops, DictConfig) else crops
        return dataclasses.replace(section, **dataclasses.asdict(self.triples[index]),
                                   global_local_crop_pairs_ratios=1.0)


def largest_crop_size(sizes: Any) -> int:
    """A crop-size knob's value (one size or a list), as one size: the largest."""
    return max(int(size) for size in _as_list(sizes))


def training_image_size(crops: CropsConfig | DictConfig) -> int:
    """The resolution a run trains at, for evaluations: its global crop size, the largest with mixed
    resolution (the one a high-resolution adaptation adapts the model to)."""
    return largest_crop_size(crops.global_crops_size)


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, ListConfig):
        value = OmegaConf.to_object(value)
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_size(key: str, value: Any, patch_size: int) -> None:
    if value is None and key == "gram_teacher_crops_size":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"crops.{key} has {value!r}, which is not a positive whole number of pixels")
    if value % patch_size:
        lower = max(patch_size, value // patch_size * patch_size)
        raise ConfigError(f"crops.{key} = {value} is not a multiple of student.patch_size = {patch_size}; "
                          f"use {lower} or {lower + patch_size}")


def _checked_ratios(value: Any, n_triples: int) -> tuple[float, ...]:
    ratios = _as_list(value)
    if len(ratios) != n_triples:
        raise ConfigError(f"crops.{RATIOS_KEY} has {len(ratios)} entries for {n_triples} crop-size triples; "
                          "give one probability per (global, local, Gram-teacher) triple")
    if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r >= 0 for r in ratios):
        raise ConfigError(f"crops.{RATIOS_KEY} = {ratios} must hold probabilities (numbers >= 0)")
    if not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
        raise ConfigError(f"crops.{RATIOS_KEY} = {ratios} sums to {sum(ratios):.6g}, not 1; give the probability "
                          "of each crop-size triple")
    return tuple(float(r) for r in ratios)

