"""Evaluation protocols on a backbone: features of the train and val datasets, then k-NN or a
linear probe; also k-NN over checkpoints (the trainer's online k-NN is in `dinoscale.eval.online`).

`cfg` is the `eval` config section.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Collection, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from dinoscale.data.pool import IMAGE_EXTENSIONS, ImagePool, open_pool
from dinoscale.errors import ConfigError, DataError
from dinoscale.eval.config import EvalConfig
from dinoscale.eval.features import FeatureSet, LabelledImages, extract_features
from dinoscale.eval.knn import KnnResult, knn_classify
from dinoscale.eval.linear import LinearProbeResult, linear_probe
from dinoscale.utils.device import default_device
from dinoscale.utils.logging import get_logger

ALL_VAL = "all"

log = get_logger(__name__)


def open_labelled(path: str | os.PathLike, role: str) -> ImagePool:
    """An image pool whose items have class labels: a folder with one sub-folder per class, a CSV
    file with `path` and `label` columns, a path list whose images lie in one folder per class, or
    tar shards with labels."""
    if not str(path):
        raise DataError(f"no {role} dataset given; pass --{role} DIR or set eval.{role}_dataset")
    pool = open_pool(path)
    if pool.labels is None:
        raise DataError(f"{role} dataset {path} has no labels; put its images in one sub-folder per class, or list "
                        "them in a CSV file with `path` and `label` columns")
    if role == "train" and len(pool.class_names) < 2:
        raise DataError(f"train dataset {path} has a single class ('{pool.class_names[0]}'), so every image would be "
                        "classified right; give it one sub-folder (or CSV label) per class")
    return pool


def aligned_labels(train: FeatureSet, val: FeatureSet) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Train and val labels indexed by the train class names (val may hold a subset of the classes)."""
    train_labels, val_labels = train.require_labels("train"), val.require_labels("val")
    if train.class_names is None or val.class_names is None or train.class_names == val.class_names:
        n_classes = len(train.class_names) if train.class_names else int(max(train_labels.max(), val_labels.max())) + 1
        return train_labels, val_labels, n_classes
    index = {name: i for i, name in enumerate(train.class_names)}
    unknown = sorted(set(val.class_names) - set(index))
    if unknown:
        raise DataError(f"val classes {unknown[:5]} do not exist in the train dataset; "
                        "both need the same class sub-folders")
    remap = torch.tensor([index[name] for name in val.class_names])
    return train_labels, remap[val_labels], len(train.class_names)


def _features(model: nn.Module, images: LabelledImages, cfg: EvalConfig, device: torch.device, desc: str) -> FeatureSet:
    if not cfg.image_size:
        raise ConfigError("eval.image_size is not set; give the resolution to evaluate at (the `dinoscale eval` "
                          "commands take it from the weights: dinoscale.eval.resolution.eval_resolution)")
    return extract_features(model, images, image_size=cfg.image_size, batch_size=cfg.batch_size,
                            num_workers=cfg.num_workers, device=device, precision=cfg.precision, desc=desc,
                            resize=cfg.resize)


def evaluate_knn(model: nn.Module, train_images: LabelledImages, val_images: LabelledImages, cfg: EvalConfig,
                 device: torch.device | None = None) -> KnnResult:
    """Weighted k-NN of the val images against the train images (eval.knn_* settings)."""
    return evaluate_knn_subsets(model, train_images, val_images, cfg, {}, device)[ALL_VAL]


def evaluate_knn_subsets(model: nn.Module, train_images: LabelledImages, val_images: LabelledImages, cfg: EvalConfig,
                         subsets: Mapping[str, Collection[str]], device: torch.device | None = None,
                         ) -> dict[str, KnnResult]:
    """Weighted k-NN of all val images (`ALL_VAL`) and of each named subset of their keys, from one
    extraction of the features."""
    device = device or default_device()
    train = _features(model, train_images, cfg, device, "k-NN train features")
    val = _features(model, val_images, cfg, device, "k-NN val features")
    results = {}
    for name, queries in {ALL_VAL: val, **{n: val.subset(keys) for n, keys in subsets.items()}}.items():
        if len(queries) == 0:
            raise DataError(f"the val subset '{name}' holds no readable val image")
        train_labels, val_labels, n_classes = aligned_labels(train, queries)
        results[name] = knn_classify(train.select(cfg.knn_features), train_labels,
                                     queries.select(cfg.knn_features).to(device), val_labels, ks=list(cfg.knn_k),
                                     temperature=cfg.knn_temperature, n_classes=n_classes,
                                     query_chunk_size=cfg.knn_query_chunk_size,
                                     bank_chunk_size=cfg.knn_bank_chunk_size)
    return results


def read_key_subset(path: str | os.PathLike, images: LabelledImages) -> set[str]:
    """Keys of `images` selected by `path`: a boolean .npy mask over the items in pool order (such as
    a curation dedup stage's contaminated.npy), or a text file of keys or image paths relative to the
    dataset, one per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"subset file {path} does not exist; give a boolean .npy mask or a text file of keys")
    if path.suffix == ".npy":
        mask = np.load(path)
        if mask.dtype != bool or mask.shape != (len(images),):
            raise DataError(f"{path} holds {mask.dtype} of shape {mask.shape}; a subset mask is a boolean array "
                            f"with one entry per dataset item ({len(images)})")
        return {images.keys[i] for i in np.flatnonzero(mask)}
    lines = [line.strip() for line in path.read_text().splitlines()]
    keys = {_without_image_extension(line) for line in lines if line and not line.startswith("#")}
    unknown = sorted(keys - set(images.keys))
    if unknown:
        raise DataError(f"{path}: {len(unknown)} keys are not in the dataset (first: {', '.join(unknown[:3])}); "
                        f"keys look like '{images.keys[0]}' (the path below the dataset, extension optional)")
    return keys


def _without_image_extension(name: str) -> str:
    stem, dot, extension = name.rpartition(".")
    return stem if dot and f".{extension.lower()}" in IMAGE_EXTENSIONS else name


def evaluate_linear(model: nn.Module, train_images: LabelledImages, val_images: LabelledImages, cfg: EvalConfig,
                    device: torch.device | None = None, seed: int = 0) -> LinearProbeResult:
    """Linear probe trained on the train images (grid chosen on a held-out part), scored on the val images."""
    device = device or default_device()
    train = _features(model, train_images, cfg, device, "linear train features")
    val = _features(model, val_images, cfg, device, "linear val features")
    train_labels, val_labels, n_classes = aligned_labels(train, val)
    return linear_probe(train.select(cfg.linear_features).to(device), train_labels,
                        val.select(cfg.linear_features).to(device), val_labels, lrs=list(cfg.linear_lrs),
                        weight_decays=list(cfg.linear_weight_decays), epochs=cfg.linear_epochs,
                        batch_size=cfg.linear_batch_size, val_fraction=cfg.linear_val_fraction,
                        n_classes=n_classes, seed=seed)


def knn_metrics(result: KnnResult) -> dict[str, float]:
    """Flat `knn_top1_k{K}` / `knn_top5_k{K}` values, as a trainer logs them to its metrics file."""
    metrics = {f"knn_top1_k{k}": v for k, v in result.top1.items()}
    metrics.update({f"knn_top5_k{k}": v for k, v in result.top5.items()})
    return metrics


def checkpoint_iteration(path: str | os.PathLike) -> int | None:
    """The training iteration in a checkpoint's name (`model_0004999.pth`, `5000/teacher.pth`), if any."""
    path = Path(path)
    numbers = re.findall(r"\d+", f"{path.parent.name}/{path.stem}")
    return int(numbers[-1]) if numbers else None


def knn_over_checkpoints(checkpoints: Sequence[str | os.PathLike], train_images: LabelledImages,
                         val_images: LabelledImages, cfg: EvalConfig, load: Callable[[str], nn.Module],
                         device: torch.device | None = None) -> list[dict]:
    """k-NN of every checkpoint (`load(path)` gives its backbone), ordered by iteration."""
    points = []
    for position, path in enumerate(checkpoints):
        result = evaluate_knn(load(str(path)), train_images, val_images, cfg, device)
        iteration = checkpoint_iteration(path)
        points.append({"checkpoint": str(path), "iteration": position if iteration is None else iteration,
                       "top1": result.top1, "top5": result.top5})
        log.info("k-NN of %s: %s", path, {k: round(v, 2) for k, v in result.top1.items()})
    return sorted(points, key=lambda p: p["iteration"])
