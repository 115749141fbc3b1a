"""Images with per-pixel targets for the dense probes: segmentation masks and depth maps.

The format users have: an image folder (or any pool) and, beside it, a folder of targets whose
files have the images' relative stems (`IMAGES/a/0001.jpg` <-> `MASKS/a/0001.png`):
- segmentation masks: PNGs holding one class index per pixel, `ignore_index` (VOC: 255) where
  unlabelled, as palette or greyscale images, as VOC and ADE20k ship them;
- depth maps: 16-bit PNGs (value / `normalization_constant`, e.g. millimetres to metres, as NYU)
  or float .npy arrays; 0 or non-finite values mark pixels without depth.

Bad targets are found, counted and reported, never dropped silently: an image without its
target file, a target whose size differs from its image, a mask with a label at or above the
class count (other than the ignore index), a target file that cannot be read. By default they
stop the evaluation with the counts and a few of the keys; with `skip_bad_targets` they are left
out and their counts travel with the result. Undecodable images are skipped and counted as
everywhere in dinoscale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from dinoscale.data.pool import ImagePool, open_pool
from dinoscale.errors import DataError
from dinoscale.eval.config import DenseEvalConfig
from dinoscale.utils.logging import get_logger

MASK_EXTENSIONS = (".png",)
DEPTH_EXTENSIONS = (".png", ".npy")
N_EXAMPLES = 5

# problem kinds, as counted and reported
MISSING = "no target file"
SIZE_MISMATCH = "target size differs from the image"
LABEL_OUT_OF_RANGE = "label at or above num_classes"
UNREADABLE_TARGET = "unreadable target"
UNREADABLE_IMAGE = "unreadable image"
HOW_TO_FIX = {
    MISSING: "give every image a target with the same relative stem",
    SIZE_MISMATCH: "write targets at their image's size",
    LABEL_OUT_OF_RANGE: "raise eval.dense.num_classes or mark unlabelled pixels with eval.dense.ignore_index",
    UNREADABLE_TARGET: "masks must be single-channel PNGs, depth maps 16-bit PNGs or 2-D .npy arrays",
}

log = get_logger(__name__)


class TargetProblem(Exception):
    """An item's target cannot be used; `kind` is one of the problem kinds above."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


@dataclass
class Problems:
    """Bad items by kind: the keys and what is wrong with each."""

    items: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def add(self, kind: str, key: str, detail: str) -> None:
        self.items.setdefault(kind, []).append((key, detail))

    def merge(self, other: "Problems") -> None:
        for kind, entries in other.items.items():
            self.items.setdefault(kind, []).extend(entries)

    def counts(self) -> dict[str, int]:
        return {kind: len(entries) for kind, entries in sorted(self.items.items())}

    def describe(self, role: str, total: int) -> str:
        parts = []
        for kind, entries in sorted(self.items.items()):
            examples = "; ".join(f"{key} ({detail})" for key, detail in sorted(entries)[:N_EXAMPLES])
            fix = f" — {HOW_TO_FIX[kind]}" if kind in HOW_TO_FIX else ""
            parts.append(f"{len(entries)} x {kind}{fix}: {examples}{' ...' if len(entries) > N_EXAMPLES else ''}")
        return f"dense {role} dataset: {sum(self.counts().values())} of {total} images have bad targets: " + \
            " | ".join(parts)


def _target_files(root: Path, extensions: tuple[str, ...]) -> dict[str, Path]:
    """Relative stem -> file, for every target file below `root`."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in extensions and not path.name.startswith("."):
            files.setdefault(path.relative_to(root).with_suffix("").as_posix(), path)
    return files


def read_mask(path: Path) -> np.ndarray:
    """A label mask as an int64 [H, W] array of class indices (palette PNGs give their indices)."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
                raise TargetProblem(UNREADABLE_TARGET, f"{path.name} is a {image.mode} image, not a label mask")
            return np.asarray(image, dtype=np.int64)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise TargetProblem(UNREADABLE_TARGET, f"{path.name}: {err}") from None


def read_depth(path: Path, normalization_constant: float) -> np.ndarray:
    """A depth map as float32 [H, W]: .npy as stored, a PNG divided by `normalization_constant`."""
    try:
        if path.suffix.lower() == ".npy":
            depth = np.load(path).astype(np.float32)
            depth = depth[..., 0] if depth.ndim == 3 and depth.shape[-1] == 1 else depth
        else:
            with Image.open(path) as image:
                if image.mode not in ("I", "I;16", "I;16B", "I;16L", "L", "F"):
                    raise TargetProblem(UNREADABLE_TARGET, f"{path.name} is a {image.mode} image, not a depth map")
                depth = np.asarray(image, dtype=np.float32) / normalization_constant
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise TargetProblem(UNREADABLE_TARGET, f"{path.name}: {err}") from None
    if depth.ndim != 2:
        raise TargetProblem(UNREADABLE_TARGET, f"{path.name} has shape {depth.shape}, not [H, W]")
    return depth


@dataclass
class DenseItem:
    image: Image.Image
    mask: np.ndarray | None  # int64 [H, W]
    depth: np.ndarray | None  # float32 [H, W]


class DenseDataset:
    """A pool of images with segmentation masks and/or depth maps matched by key.

    `indices` are the items that have every target file; images without one are in `problems`.
    """

    def __init__(self, images: str | os.PathLike | ImagePool, masks: str | os.PathLike | None = None,
                 depth: str | os.PathLike | None = None, role: str = "train", ignore_index: int = 255,
                 reduce_zero_label: bool = False, depth_normalization_constant: float = 1000.0):
        if not masks and not depth:
            raise DataError(f"the dense {role} dataset has neither masks nor depth maps; set "
                            f"eval.dense.{role}_masks and/or eval.dense.{role}_depth")
        self.pool = images if isinstance(images, ImagePool) else open_pool(images)
        self.role, self.ignore_index, self.reduce_zero_label = role, ignore_index, reduce_zero_label
        self.depth_normalization_constant = depth_normalization_constant
        self.problems = Problems()
        self.mask_files = self._match(masks, MASK_EXTENSIONS, "masks")
        self.depth_files = self._match(depth, DEPTH_EXTENSIONS, "depth")
        missing = {key for key, _ in self.problems.items.get(MISSING, [])}
        self.indices = [i for i, key in enumerate(self.pool.keys) if key not in missing]

    @property
    def has_masks(self) -> bool:
        return self.mask_files is not None

    @property
    def has_depth(self) -> bool:
        return self.depth_files is not None

    def _match(self, root: Any, extensions: tuple[str, ...], what: str) -> list[Path] | None:
        if not root:
            return None
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"dense {self.role} {what} folder {root} does not exist")
        files = _target_files(root, extensions)
        keys = list(self.pool.keys)
        for key in keys:
            if key not in files:
                self.problems.add(MISSING, key, f"no {what} file {key}{extensions[0]} under {root}")
        orphans = len(set(files) - set(keys))
        if orphans:
            log.warning("dense %s %s: %d files in %s have no image; they are not used", self.role, what, orphans, root)
        return [files.get(key) for key in keys]

    def __len__(self) -> int:
        return len(self.pool)

    def load(self, index: int, n_classes: int | None) -> DenseItem | None:
        """Item `index` with its targets, None when the image cannot be decoded (counted by the pool).

        Raises TargetProblem when a target is unusable; labels are checked against `n_classes` when given.
        """
        image = self.pool.load(index)
        if image is None:
            return None
        mask = depth = None
        if self.mask_files is not None:
            mask = read_mask(self.mask_files[index])
            if self.reduce_zero_label:  # ADE20k: 0 is "other", unlabelled; the classes shift down by one
                mask = np.where(mask == 0, self.ignore_index, np.where(mask == self.ignore_index, mask, mask - 1))
            self._check_size(mask, image, "mask")
            labels = mask[mask != self.ignore_index]
            if n_classes is not None and labels.size and labels.max() >= n_classes:
                raise TargetProblem(LABEL_OUT_OF_RANGE, f"label {int(labels.max())} with num_classes {n_classes}")
        if self.depth_files is not None:
            depth = read_depth(self.depth_files[index], self.depth_normalization_constant)
            self._check_size(depth, image, "depth map")
        return DenseItem(image, mask, depth)

    @staticmethod
    def _check_size(target: np.ndarray, image: Image.Image, what: str) -> None:
        if target.shape != (image.height, image.width):
            raise TargetProblem(SIZE_MISMATCH, f"{what} {target.shape[1]}x{target.shape[0]}, "
                                               f"image {image.width}x{image.height}")


def report_problems(problems: Problems, role: str, total: int, skip: bool) -> dict[str, int]:
    """Stop with a DataError naming the problems, or (skip) log them; returns the counts by kind.

    Undecodable images are always skipped and counted, as everywhere in dinoscale."""
    bad = Problems({k: v for k, v in problems.items.items() if k != UNREADABLE_IMAGE})
    if bad.items and not skip:
        raise DataError(bad.describe(role, total) + ". Fix them, or set eval.dense.skip_bad_targets=true to "
                                                    "leave these images out")
    if problems.items:
        log.warning("%s; these images are left out", problems.describe(role, total))
    return problems.counts()


def open_dense_datasets(cfg: DenseEvalConfig) -> tuple[DenseDataset, DenseDataset]:
    """The train and val dense datasets of the `eval.dense` config section."""
    for role in ("train", "val"):
        if not cfg[f"{role}_dataset"]:
            raise DataError(f"no dense {role} images; set eval.dense.{role}_dataset (or pass --{role})")
    if bool(cfg.train_masks) != bool(cfg.val_masks) or bool(cfg.train_depth) != bool(cfg.val_depth):
        raise DataError("give masks (eval.dense.train_masks / val_masks) and depth maps (train_depth / val_depth) "
                        "for both the train and the val images, or for neither")
    return tuple(DenseDataset(cfg[f"{role}_dataset"], cfg[f"{role}_masks"] or None, cfg[f"{role}_depth"] or None,
                              role, cfg.ignore_index, cfg.reduce_zero_label, cfg.depth_normalization_constant)
                 for role in ("train", "val"))
