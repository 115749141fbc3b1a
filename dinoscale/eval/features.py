"""Frozen-backbone features of a labelled image pool: CLS token, mean patch token, or both.

Images go through the standard evaluation transform (resize to 256/224 of the crop, centre
crop, ImageNet normalisation), or with `resize="whole_image"` are resized whole to the square
input, and then through the backbone in bf16 autocast where the hardware has it. The data-loader
workers decode and resize each image with PIL and hand over uint8 batches; conversion and
normalisation run once per batch on the model's device, with the same numbers as the per-image
transform. Under torch.distributed each rank embeds a contiguous slice of the pool and the slices
are all-gathered, so every rank ends with the features of the whole pool in pool order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from dinoscale.data.augment import IMAGENET_MEAN, IMAGENET_STD
from dinoscale.errors import ConfigError, DataError
from dinoscale.distributed import is_distributed, rank, world_size
from dinoscale.utils.device import default_device, inference_autocast
from dinoscale.utils.logging import get_logger, progress

RESIZE_RATIO = 256 / 224
RESIZE_MODES = ("center_crop", "whole_image")
FEATURE_KINDS = ("cls", "patch_mean", "cls_patchmean")
GATHER_BLOCK_ROWS = 16384

log = get_logger(__name__)


class LabelledImages(Protocol):
    """What feature extraction reads: an `ImagePool` or `ArrayImages`."""

    keys: list[str]
    labels: list[int] | None
    class_names: list[str] | None

    def __len__(self) -> int: ...

    def load(self, index: int) -> Image.Image | None: ...


class ArrayImages:
    """Images held in memory (uint8 [N, H, W, 3]) with integer labels, read like a pool."""

    def __init__(self, images: np.ndarray, labels: Sequence[int] | None = None,
                 class_names: Sequence[str] | None = None):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataError(f"array images must be uint8 of shape [N, H, W, 3], got {images.dtype} {images.shape}")
        if labels is not None and len(labels) != len(images):
            raise DataError(f"{len(images)} array images but {len(labels)} labels")
        self.images = images
        self.labels = None if labels is None else [int(y) for y in labels]
        n_classes = 0 if self.labels is None else max(self.labels) + 1
        self.class_names = list(class_names) if class_names is not None else (
            None if self.labels is None else [str(c) for c in range(n_classes)])
        self.keys = [f"{i:08d}" for i in range(len(images))]

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index], "RGB")


@dataclass
class FeatureSet:
    """Features of the readable items of a pool (skipped images have no row), on CPU in float32."""

    cls: torch.Tensor
    patch_mean: torch.Tensor
    labels: torch.Tensor | None
    keys: list[str]
    class_names: list[str] | None

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, kind: str) -> torch.Tensor:
        """`cls`, `patch_mean`, or their concatenation `cls_patchmean` (DINOv2's linear-probe input)."""
        if kind == "cls":
            return self.cls
        if kind == "patch_mean":
            return self.patch_mean
        if kind == "cls_patchmean":
            return torch.cat([self.cls, self.patch_mean], dim=1)
        raise ConfigError(f"unknown feature kind '{kind}'; choose one of {', '.join(FEATURE_KINDS)}")

    def subset(self, keys: Collection[str]) -> "FeatureSet":
        """The rows whose key is in `keys`, in the same order."""
        keys = set(keys)
        rows = torch.tensor([key in keys for key in self.keys], dtype=torch.bool)
        return FeatureSet(cls=self.cls[rows], patch_mean=self.patch_mean[rows],
                          labels=None if self.labels is None else self.labels[rows],
                          keys=[key for key in self.keys if key in keys], class_names=self.class_names)

    def require_labels(self, name: str) -> torch.Tensor:
        if self.labels is None:
            raise DataError(f"the {name} dataset has no labels; put its images in one sub-folder per class")
        return self.labels


def eval_crop(image_size: int, resize: str = "center_crop") -> transforms.Compose:
    """PIL in, PIL out. `center_crop`: resize the short side to 256/224 of `image_size`, then
    centre-crop `image_size` (the DINO protocol). `whole_image`: resize the whole image to
    `image_size` x `image_size` (nothing cut off; a non-square image is stretched)."""
    bicubic = transforms.InterpolationMode.BICUBIC
    if resize == "whole_image":
        return transforms.Compose([transforms.Resize((image_size, image_size), interpolation=bicubic)])
    if resize != "center_crop":
        raise ConfigError(f"eval.resize = {resize!r} is unknown; choose one of {', '.join(RESIZE_MODES)}")
    return transforms.Compose([transforms.Resize(round(image_size * RESIZE_RATIO), interpolation=bicubic),
                               transforms.CenterCrop(image_size)])


def describe_resize(image_size: int, resize: str) -> str:
    """How `eval_crop` turns an image into the model input, in words (for reports)."""
    if resize == "whole_image":
        return f"whole image resized to {image_size}x{image_size} px (no crop)"
    return f"short side resized to {round(image_size * RESIZE_RATIO)} px, centre crop of {image_size} px"


def to_model_input() -> transforms.Compose:
    """PIL image -> ImageNet-normalised float tensor (C, H, W)."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def normalise_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> ImageNet-normalised float32, bit for bit what `to_model_input` gives each image."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return images.float().div_(255).sub_(mean).div_(std)


def eval_transform(image_size: int) -> transforms.Compose:
    """The standard evaluation transform: `eval_crop` then `to_model_input`."""
    return transforms.Compose([eval_crop(image_size), to_model_input()])


def check_image_size(model: nn.Module, image_size: int) -> None:
    patch_size = getattr(model, "patch_size", 1)
    if image_size % patch_size:
        raise ConfigError(f"eval.image_size = {image_size} is not a multiple of the backbone's patch size "
                          f"{patch_size}; pick e.g. {image_size - image_size % patch_size or patch_size}")


class _ResizedImages(Dataset):
    """Item i: the image of `indices[i]` decoded and resized by `crop`, as uint8 (3, S, S)."""

    def __init__(self, images: LabelledImages, indices: range, crop: Any, image_size: int):
        self.images, self.indices, self.crop, self.image_size = images, indices, crop, image_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        index = self.indices[i]
        image = self.images.load(index)
        if image is None:  # skipped (already counted and logged by the pool)
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), index, False
        return torch.from_numpy(np.array(self.crop(image), dtype=np.uint8)).permute(2, 0, 1), index, True


def slice_of_rank(n: int) -> range:
    r, w = rank(), world_size()
    return range(r * n // w, (r + 1) * n // w)


def all_gather_rows(local: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every rank's rows (CPU) concatenated in rank order; ranks may hold different row counts.

    Rows travel in blocks so device memory stays bounded whatever the pool size.
    """
    if not is_distributed():
        return local
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([len(local)], device=device))
    sizes = [int(s.item()) for s in sizes]
    pieces: list[list[torch.Tensor]] = [[] for _ in sizes]
    for start in range(0, max(sizes), GATHER_BLOCK_ROWS):
        block = torch.zeros((min(GATHER_BLOCK_ROWS, max(sizes) - start), *local.shape[1:]), dtype=local.dtype,
                            device=device)
        mine = local[start:start + len(block)]
        block[:len(mine)] = mine.to(device)
        gathered = [torch.empty_like(block) for _ in sizes]
        dist.all_gather(gathered, block)
        for rank_pieces, rows in zip(pieces, gathered):
            rank_pieces.append(rows.cpu())
    return torch.cat([torch.cat(p)[:n] if p else local[:0] for p, n in zip(pieces, sizes)])


@torch.no_grad()
def extract_features(model: nn.Module, images: LabelledImages, image_size: int = 224, batch_size: int = 128,
                     num_workers: int = 0, device: torch.device | None = None, precision: str = "auto",
                     desc: str = "features", resize: str = "center_crop") -> FeatureSet:
    """CLS and mean patch tokens (after the final norm) of every readable image, in pool order.

    `num_workers` data-loader processes decode and resize the images (`resize`: see `eval_crop`)."""
    check_image_size(model, image_size)
    if len(images) == 0:
        raise DataError(f"the {desc} dataset is empty")
    device = device or default_device()
    was_training = model.training
    model = model.to(device).eval()
    dataset = _ResizedImages(images, slice_of_rank(len(images)), eval_crop(image_size, resize), image_size)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    cls_rows, patch_rows, kept = [], [], []
    for batch, indices, valid in progress(loader, desc=desc, total=len(loader)):
        batch = normalise_batch(batch[valid].to(device, non_blocking=True))
        if len(batch):
            with inference_autocast(device, precision):
                out = model.forward_features(batch)
            cls_rows.append(out["x_norm_clstoken"].float().cpu())
            patch_rows.append(out["x_norm_patchtokens"].float().mean(dim=1).cpu())
        kept.append(indices[valid])
    model.train(was_training)
    empty = torch.zeros(0, model.embed_dim)
    cls = all_gather_rows(torch.cat(cls_rows) if cls_rows else empty, device)
    patch_mean = all_gather_rows(torch.cat(patch_rows) if patch_rows else empty, device)
    index = all_gather_rows(torch.cat(kept), device)
    if len(index) == 0:
        raise DataError(f"no image of the {desc} dataset could be read")
    if len(index) < len(images):
        log.warning("%s: %d of %d images could not be read and were left out", desc, len(images) - len(index),
                    len(images))
    labels = None if images.labels is None else torch.as_tensor(images.labels, dtype=torch.long)[index]
    return FeatureSet(cls=cls, patch_mean=patch_mean, labels=labels, keys=[images.keys[i] for i in index.tolist()],
                      class_names=images.class_names)
