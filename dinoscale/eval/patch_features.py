"""Patch features of images with dense targets, for the dense probes.

A featurizer turns normalised images into per-patch features: a frozen ViT's patch tokens
(DINOv3's `backbone_out_layers` LAST or FOUR_LAST, optionally with the CLS token appended) or,
as the baseline, each patch's raw pixels. Images are resized to `eval.dense.image_size` and go
through it once, in bf16 autocast where the hardware has it; every rank takes a slice of the
images. Bad items are collected by kind (see dense_data) and reported once, over all ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dinoscale.distributed import is_distributed, world_size
from dinoscale.errors import DataError
from dinoscale.eval.config import EvalConfig
from dinoscale.eval.dense_data import UNREADABLE_IMAGE, DenseDataset, Problems, TargetProblem, report_problems
from dinoscale.eval.features import all_gather_rows, slice_of_rank, to_model_input
from dinoscale.utils.device import inference_autocast
from dinoscale.utils.logging import progress

FOUR_LAST = 4


class PatchFeaturizer(Protocol):
    """Normalised images [B, 3, H, W] -> patch features [B, H / patch_size, W / patch_size, F]."""

    patch_size: int

    def __call__(self, images: Tensor) -> Tensor: ...


class BackbonePatches:
    """A frozen ViT's patch tokens after the final norm: of the last block (`LAST`) or of the last
    four concatenated (`FOUR_LAST`), each followed by the CLS token when `use_cls_token`."""

    def __init__(self, model: nn.Module, backbone_out_layers: str = "LAST", use_cls_token: bool = False):
        self.model, self.use_cls_token = model, use_cls_token
        self.n_layers = 1 if backbone_out_layers == "LAST" else min(FOUR_LAST, model.n_blocks)
        self.patch_size = model.patch_size

    def __call__(self, images: Tensor) -> Tensor:
        parts = []
        for patches, cls in self.model.get_intermediate_layers(images, n=self.n_layers, reshape=True,
                                                               return_class_token=True, norm=True):
            parts.append(patches)
            if self.use_cls_token:
                parts.append(cls[:, :, None, None].expand_as(patches))
        return torch.cat(parts, dim=1).permute(0, 2, 3, 1)


class PixelPatches:
    """The normalised pixels of each patch (3 x patch_size² values): the baseline a backbone must beat."""

    def __init__(self, patch_size: int):
        self.patch_size = patch_size

    def __call__(self, images: Tensor) -> Tensor:
        p = self.patch_size
        patches = images.unfold(2, p, p).unfold(3, p, p)  # [B, 3, h, w, p, p]
        return patches.permute(0, 2, 3, 1, 4, 5).flatten(3)


def resize_nearest(target: np.ndarray, size: int) -> np.ndarray:
    """A label or depth map resampled to size x size by its nearest pixel (no mixing of values)."""
    rows = ((np.arange(size) + 0.5) * target.shape[0] / size).astype(np.int64)
    cols = ((np.arange(size) + 0.5) * target.shape[1] / size).astype(np.int64)
    return target[rows[:, None], cols[None, :]]


class _DenseItems(Dataset):
    """Model inputs and targets of `indices`; targets at `target_size` (None: their own size)."""

    def __init__(self, dataset: DenseDataset, indices: list[int], image_size: int, target_size: int | None,
                 n_classes: int | None):
        self.dataset, self.indices, self.image_size = dataset, indices, image_size
        self.target_size, self.n_classes = target_size, n_classes
        self.to_input = to_model_input()

    def __len__(self) -> int:
        return len(self.indices)

    def _target(self, array: np.ndarray | None, dtype: torch.dtype) -> Tensor | None:
        if array is None:
            return None
        if self.target_size is not None:
            array = resize_nearest(array, self.target_size)
        return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        try:
            item = self.dataset.load(index, self.n_classes)
        except TargetProblem as problem:
            return {"index": index, "problem": (problem.kind, problem.detail)}
        if item is None:
            return {"index": index, "problem": (UNREADABLE_IMAGE, "cannot be decoded")}
        image = item.image.resize((self.image_size, self.image_size), Image.BICUBIC)
        return {"index": index, "problem": None, "image": self.to_input(image), "picture": np.asarray(image),
                "mask": self._target(item.mask, torch.int32), "depth": self._target(item.depth, torch.float32)}


def _collate(items: list[dict]) -> list[dict]:
    return items


def dense_batches(dataset: DenseDataset, indices: list[int], image_size: int, target_size: int | None,
                 n_classes: int | None, batch_size: int, num_workers: int, problems: Problems,
                 desc: str) -> Iterator[tuple[Tensor, list[dict]]]:
    """Batches of good items as (images [B, 3, S, S], items); bad items go to `problems`."""
    loader = DataLoader(_DenseItems(dataset, indices, image_size, target_size, n_classes), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate)
    for items in progress(loader, desc=desc, total=len(loader)):
        good = []
        for item in items:
            if item["problem"] is None:
                good.append(item)
            else:
                kind, detail = item["problem"]
                problems.add(kind, dataset.pool.keys[item["index"]], detail)
        if good:
            yield torch.stack([item["image"] for item in good]), good


def all_problems(dataset: DenseDataset, found: Problems) -> Problems:
    """The dataset's missing targets (known to every rank) and what each rank found while loading."""
    everyone = [found]
    if is_distributed():
        everyone = [None] * world_size()
        dist.all_gather_object(everyone, found)
    merged = Problems()
    merged.merge(dataset.problems)
    for other in everyone:
        merged.merge(other)
    return merged


def patch_features(featurizer: PatchFeaturizer, images: Tensor, device: torch.device, precision: str) -> Tensor:
    with torch.no_grad(), inference_autocast(device, precision):
        return featurizer(images.to(device, non_blocking=True)).float()


@dataclass
class TrainFeatures:
    """Patch features [N, h, w, F] of the train images and their targets at [N, S, S] (all ranks)."""

    features: Tensor
    masks: Tensor | None
    depth: Tensor | None
    skipped: dict[str, int]


def train_features(featurizer: PatchFeaturizer, dataset: DenseDataset, cfg: EvalConfig, n_classes: int | None,
                   device: torch.device) -> TrainFeatures:
    """Embed this rank's slice of the train images and all-gather the features and targets."""
    dense = cfg.dense
    problems = Problems()
    mine = [dataset.indices[i] for i in slice_of_rank(len(dataset.indices))]
    rows: dict[str, list[Tensor]] = {"features": [], "masks": [], "depth": []}
    for images, items in dense_batches(dataset, mine, dense.image_size, dense.image_size, n_classes, cfg.batch_size,
                                  cfg.num_workers, problems, "dense train features"):
        rows["features"].append(patch_features(featurizer, images, device, cfg.precision).cpu())
        for name, key in (("masks", "mask"), ("depth", "depth")):
            if items[0][key] is not None:
                rows[name].append(torch.stack([item[key] for item in items]))
    skipped = report_problems(all_problems(dataset, problems), "train", len(dataset), dense.skip_bad_targets)
    size = dense.image_size
    if not rows["features"]:  # a rank without usable images still takes part in the gathers, with 0 rows
        rows["features"].append(patch_features(featurizer, torch.zeros(1, 3, size, size), device, cfg.precision)[:0].cpu())
        rows["masks"].append(torch.zeros(0, size, size, dtype=torch.int32))
        rows["depth"].append(torch.zeros(0, size, size))
    features = all_gather_rows(torch.cat(rows["features"]), device)
    gathered = {name: all_gather_rows(torch.cat(rows[name]), device) if has else None
                for name, has in (("masks", dataset.has_masks), ("depth", dataset.has_depth))}
    if len(features) < 2:
        raise DataError(f"the dense train dataset has {len(features)} usable images; the probes need at least 2")
    return TrainFeatures(features, gathered["masks"], gathered["depth"], skipped)


def infer_n_classes(masks: Tensor, ignore_index: int) -> int:
    labels = masks[masks != ignore_index]
    if labels.numel() == 0:
        raise DataError("every pixel of the train masks is ignore_index; nothing to train the segmentation probe on")
    return int(labels.max()) + 1
