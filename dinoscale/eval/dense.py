"""Linear segmentation and depth probes on frozen patch features (the DINOv2/DINOv3 linear protocol).

Each image is resized to `eval.dense.image_size` and goes through the frozen backbone once
(patch_features). A linear layer per patch predicts class logits or depth-bin weights; its
outputs are upsampled bilinearly to the label map's size, as the reference heads do, and trained
on the cached features with the linear probe's batched learning-rate x weight-decay grid
(segmentation / depth hold the losses and metrics). The grid point with the best mIoU (lowest
RMSE for depth) on a held-out part of the train images is retrained on all of them and scored
on the val images at each label map's own size.

Across ranks: every rank embeds a slice of the train images and the features are all-gathered,
so every rank trains the same probe; every rank scores a slice of the val images and the
confusion matrix and the depth sums are all-reduced.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from dinoscale.distributed import all_reduce_sum, rank
from dinoscale.errors import ConfigError, DataError
from dinoscale.eval.config import DenseEvalConfig, EvalConfig
from dinoscale.eval.dense_data import DenseDataset, Problems, report_problems
from dinoscale.eval.depth import DepthTask
from dinoscale.eval.features import slice_of_rank
from dinoscale.eval.linear import feature_statistics, linear_outputs, train_linear_heads
from dinoscale.eval.patch_features import (BackbonePatches, PatchFeaturizer, all_problems, dense_batches,
                                           infer_n_classes, patch_features, train_features)
from dinoscale.eval.segmentation import SegmentationTask
from dinoscale.utils.device import default_device
from dinoscale.utils.logging import get_logger

SCORE_IMAGES = 64  # held-out images scored at once by all grid points

log = get_logger(__name__)

Task = SegmentationTask | DepthTask


# ----------------------------------------------------------------------------- fitting
@dataclass
class DenseHead:
    """A trained per-patch linear layer and the feature statistics its inputs are normalised with;
    chosen on `n_val` held-out images, retrained on all `n_train`."""

    weight: Tensor  # [1, F, C]
    bias: Tensor  # [1, C]
    mean: Tensor | float
    std: Tensor | float
    lr: float
    weight_decay: float
    val_score: float
    grid: list[dict]
    n_train: int
    n_val: int

    def outputs(self, features: Tensor) -> Tensor:
        """[B, h, w, C] outputs of this head on patch features [B, h, w, F]."""
        return linear_outputs((features - self.mean) / self.std, self.weight, self.bias)[0]


def _statistics(features: Tensor, use_batchnorm: bool) -> tuple[Tensor | float, Tensor | float]:
    return feature_statistics(features) if use_batchnorm else (0.0, 1.0)


def _grid_sums(task: Task, features: Tensor, targets: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    sums = None
    for start in range(0, len(features), SCORE_IMAGES):
        chunk = task.sums(linear_outputs(features[start:start + SCORE_IMAGES], weight, bias),
                          targets[start:start + SCORE_IMAGES])
        sums = chunk if sums is None else sums + chunk
    return sums


def fit_dense_head(task: Task, features: Tensor, targets: Tensor, cfg: DenseEvalConfig, seed: int = 0) -> DenseHead:
    """Choose (lr, weight decay) on `cfg.val_fraction` of the images, retrain it on all of them."""
    if not cfg.lrs or not cfg.weight_decays:
        raise DataError("dense probe: the grid is empty; set eval.dense.lrs and eval.dense.weight_decays")
    if not 0 < cfg.val_fraction < 1:
        raise DataError(f"dense probe: eval.dense.val_fraction must be in (0, 1), got {cfg.val_fraction}")
    n = len(features)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, max(1, round(cfg.val_fraction * n)))
    fit, val = order[n_val:].sort().values, order[:n_val].sort().values
    points = list(itertools.product(cfg.lrs, cfg.weight_decays))
    lrs, wds = torch.tensor([p[0] for p in points]), torch.tensor([p[1] for p in points])

    def train(rows: Tensor, grid: slice) -> tuple[Tensor, Tensor, Tensor | float, Tensor | float]:
        mean, std = _statistics(features[rows], cfg.use_batchnorm)
        weight, bias = train_linear_heads((features[rows] - mean) / std, targets[rows], task.n_outputs, lrs[grid],
                                          wds[grid], cfg.epochs, cfg.batch_size, task.loss, seed)
        return weight, bias, mean, std

    weight, bias, mean, std = train(fit, slice(None))
    sums = _grid_sums(task, (features[val] - mean) / std, targets[val], weight, bias)
    val_scores = [getattr(task.scores(s), task.selection_metric) for s in sums]
    finite = [(s if math.isfinite(s) else -math.inf if task.higher_is_better else math.inf) for s in val_scores]
    best = int(np.argmax(finite) if task.higher_is_better else np.argmin(finite))
    weight, bias, mean, std = train(torch.arange(n), slice(best, best + 1))
    grid = [{"lr": lr, "weight_decay": wd, f"val_{task.selection_metric}": s} for (lr, wd), s in zip(points, val_scores)]
    return DenseHead(weight, bias, mean, std, lr=points[best][0], weight_decay=points[best][1],
                     val_score=val_scores[best], grid=grid, n_train=n, n_val=n_val)


# ----------------------------------------------------------------------------- scoring
@dataclass
class ProbeResult:
    """A dense probe's test scores, its chosen grid point (on `n_val` held-out images of the `n_train`
    it was retrained on) and the whole grid."""

    scores: dict
    lr: float
    weight_decay: float
    val_score: float
    n_train: int
    n_val: int
    n_test: int
    grid: list[dict] = field(default_factory=list)


@dataclass
class DenseResult:
    """Segmentation and/or depth results; `skipped` counts the images left out, by reason and split;
    `pictures` are the few val images with their true and predicted targets (RGB arrays and maps)."""

    segmentation: ProbeResult | None = None
    depth: ProbeResult | None = None
    n_classes: int | None = None
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    pictures: list[dict] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("pictures")
        return out

    def metrics(self) -> dict[str, float]:
        """Flat values to log: segmentation_miou, segmentation_pixel_accuracy, depth_rmse, depth_delta1, ..."""
        metrics = {}
        if self.segmentation is not None:
            metrics.update(segmentation_miou=self.segmentation.scores["miou"],
                           segmentation_pixel_accuracy=self.segmentation.scores["pixel_accuracy"])
        if self.depth is not None:
            metrics.update({f"depth_{k}": self.depth.scores[k] for k in ("rmse", "delta1", "abs_rel")})
        return metrics


def _batch_sums(task: Task, outputs: Tensor, targets: list[Tensor]) -> Tensor:
    """One head's sums over a batch whose targets may differ in size: images of one size are scored together."""
    total = None
    sizes = [tuple(t.shape) for t in targets]
    for size in dict.fromkeys(sizes):
        members = [i for i, s in enumerate(sizes) if s == size]
        sums = task.sums(outputs[None, members], torch.stack([targets[i] for i in members]))[0]
        total = sums if total is None else total + sums
    return total


def score_dense_heads(featurizer: PatchFeaturizer, dataset: DenseDataset, heads: dict[str, tuple[Task, DenseHead]],
                      cfg: EvalConfig, n_classes: int | None, device: torch.device,
                      n_pictures: int) -> tuple[dict[str, Tensor], Problems, int, list[dict]]:
    """Each head's metric sums over the val images (this rank's slice, then all-reduced), the
    problems found, the number of images scored, and on rank 0 up to `n_pictures` pictures:
    {"image": RGB array, "mask" / "depth": (true, predicted)}."""
    problems = Problems()
    mine = [dataset.indices[i] for i in slice_of_rank(len(dataset.indices))]
    sums = {name: task.empty_sums() for name, (task, _) in heads.items()}
    n_scored, pictures = 0, []
    for images, items in dense_batches(dataset, mine, cfg.dense.image_size, None, n_classes, cfg.batch_size,
                                  cfg.num_workers, problems, "dense val features"):
        features = patch_features(featurizer, images, device, cfg.precision)
        drawn = items[:max(n_pictures - len(pictures), 0)] if rank() == 0 else []
        new_pictures = [{"image": item["picture"]} for item in drawn]
        for name, (task, head) in heads.items():
            key = task.target
            outputs = head.outputs(features)
            sums[name] += _batch_sums(task, outputs, [item[key].to(device) for item in items]).cpu().double()
            for i, (item, picture) in enumerate(zip(drawn, new_pictures)):
                picture[key] = (item[key].numpy(), task.predict(outputs[i], tuple(item[key].shape)).cpu().numpy())
        pictures += new_pictures
        n_scored += len(items)
    for name in sums:
        all_reduce_sum(sums[name])
    total = all_reduce_sum(torch.tensor([n_scored], dtype=torch.float64))
    return sums, all_problems(dataset, problems), int(total), pictures


# ----------------------------------------------------------------------------- the protocol
def tasks_of(dataset: DenseDataset, cfg: DenseEvalConfig, n_classes: int | None) -> dict[str, Task]:
    tasks: dict[str, Task] = {}
    if dataset.has_masks:
        tasks["segmentation"] = SegmentationTask(n_classes, cfg.ignore_index)
    if dataset.has_depth:
        tasks["depth"] = DepthTask(cfg.depth_n_bins, cfg.min_depth, cfg.max_depth, cfg.bins_strategy,
                                   cfg.norm_strategy)
    return tasks


def evaluate_dense(featurizer: PatchFeaturizer, train: DenseDataset, val: DenseDataset, cfg: EvalConfig,
                   device: torch.device | None = None, seed: int = 0, n_pictures: int = 0) -> DenseResult:
    """The dense probes of `featurizer` (cfg: the `eval` section): trained on `train`, scored on `val`."""
    dense = cfg.dense
    device = device or default_device()
    if dense.image_size % featurizer.patch_size:
        raise ConfigError(f"eval.dense.image_size = {dense.image_size} is not a multiple of the patch size "
                          f"{featurizer.patch_size}; pick e.g. {dense.image_size - dense.image_size % featurizer.patch_size}")
    if train.has_masks != val.has_masks or train.has_depth != val.has_depth:
        raise DataError("the dense train and val datasets must have the same targets (masks and/or depth maps)")
    data = train_features(featurizer, train, cfg, dense.num_classes, device)
    n_classes = dense.num_classes or (infer_n_classes(data.masks, dense.ignore_index) if train.has_masks else None)
    heads = {}
    for name, task in tasks_of(train, dense, n_classes).items():
        targets = data.masks if task.target == "mask" else data.depth
        heads[name] = (task, fit_dense_head(task, data.features.to(device), targets.to(device), dense, seed))
        log.info("dense %s probe: lr %g, weight decay %g chosen (held-out score %.3f)", name, heads[name][1].lr,
                 heads[name][1].weight_decay, heads[name][1].val_score)
    sums, problems, n_test, pictures = score_dense_heads(featurizer, val, heads, cfg, n_classes, device, n_pictures)
    result = DenseResult(n_classes=n_classes, pictures=pictures, skipped={
        "train": data.skipped, "val": report_problems(problems, "val", len(val), dense.skip_bad_targets)})
    for name, (task, head) in heads.items():
        probe = ProbeResult(scores=task.scores(sums[name]).as_dict(), lr=head.lr, weight_decay=head.weight_decay,
                            val_score=head.val_score, n_train=head.n_train, n_val=head.n_val,
                            n_test=n_test, grid=head.grid)
        setattr(result, name, probe)
    return result


def backbone_patches(model: nn.Module, cfg: EvalConfig) -> BackbonePatches:
    return BackbonePatches(model, cfg.dense.backbone_out_layers, cfg.dense.use_cls_token)


def evaluate_dense_backbone(model: nn.Module, train: DenseDataset, val: DenseDataset, cfg: EvalConfig,
                            device: torch.device | None = None, seed: int = 0, n_pictures: int = 0) -> DenseResult:
    """`evaluate_dense` on a backbone's patch tokens; the model's train/eval mode is restored afterwards."""
    device = device or default_device()
    was_training = model.training
    model = model.to(device).eval()
    try:
        return evaluate_dense(backbone_patches(model, cfg), train, val, cfg, device, seed, n_pictures)
    finally:
        model.train(was_training)


def online_dense(model: nn.Module, datasets: tuple[DenseDataset, DenseDataset], cfg: EvalConfig,
                 device: torch.device | None = None) -> dict[str, float]:
    """The dense probes during training (every eval.online_dense_period_iterations): the metrics to log."""
    return evaluate_dense_backbone(model, *datasets, cfg, device).metrics()
