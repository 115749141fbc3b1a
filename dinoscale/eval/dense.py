"""Linear segmentation and depth probes on frozen patch features (the DINOv2/DINOv3 linear protocol).

Each image is resized to `eval.dense.image_size` and goes through the frozen backbone once (bf16
autocast where the hardware has it): its patch tokens after the final norm, of the last block or
the last four concatenated, optionally with the CLS token appended (the papers' variants). A
linear layer per patch predicts class logits or depth-bin weights; its outputs are upsampled
bilinearly to the label map's size, as the reference heads do, and trained on the cached
features with the linear probe's batched learning-rate x weight-decay grid. The grid point with
the best mIoU (lowest RMSE for depth) on a held-out part of the train images is retrained on
all of them and scored on the val images at each label map's own size.

Across ranks: every rank embeds a slice of the train images and the features are all-gathered,
so every rank trains the same probe; every rank scores a slice of the val images and the
confusion matrix and the depth sums are all-reduced.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dinoscale.errors import ConfigError, DataError
from dinoscale.eval.dense_data import (UNREADABLE_IMAGE, DenseDataset, Problems, TargetProblem, open_dense_datasets,
                                       report_problems)
from dinoscale.eval.depth import (N_SUMS, DepthScores, depth_scores, depth_sums, outputs_to_depth, sig_loss,
                                  upsample_depth, valid_depth)
from dinoscale.eval.features import all_gather_rows, slice_of_rank, to_model_input
from dinoscale.eval.linear import feature_statistics, linear_outputs, train_linear_heads
from dinoscale.eval.segmentation import (SegmentationScores, confusion_matrix, segmentation_loss,
                                         segmentation_scores, upsample)
from dinoscale.losses.distributed import all_reduce_sum, is_distributed, rank, world_size
from dinoscale.utils.device import default_device, inference_autocast
from dinoscale.utils.logging import get_logger, progress

SCORE_IMAGES = 64  # held-out images scored at once by all grid points
FOUR_LAST = 4

log = get_logger(__name__)


# ----------------------------------------------------------------------------- patch features
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


# ----------------------------------------------------------------------------- tasks
@dataclass
class SegmentationTask:
    n_classes: int
    ignore_index: int
    name: str = "segmentation"
    higher_is_better: bool = True

    @property
    def n_outputs(self) -> int:
        return self.n_classes

    def loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        return segmentation_loss(outputs, labels.long(), self.ignore_index)

    def predict(self, outputs: Tensor, size: tuple[int, int]) -> Tensor:
        """Class maps [..., H, W] from per-patch logits [..., h, w, C]."""
        return upsample(outputs, size).argmax(-3)

    def sums(self, outputs: Tensor, labels: Tensor) -> Tensor:
        """Confusion matrices [G, C, C] of G heads' outputs [G, B, h, w, C] against labels [B, H, W]."""
        predicted = self.predict(outputs, labels.shape[-2:])
        return torch.stack([confusion_matrix(p, labels, self.n_classes, self.ignore_index) for p in predicted])

    def scores(self, sums: Tensor) -> SegmentationScores:
        return segmentation_scores(sums)

    @staticmethod
    def headline(scores: SegmentationScores) -> float:
        return scores.miou


@dataclass
class DepthTask:
    n_bins: int
    min_depth: float
    max_depth: float
    bins_strategy: str = "linear"
    norm_strategy: str = "linear"
    name: str = "depth"
    higher_is_better: bool = False

    @property
    def n_outputs(self) -> int:
        return self.n_bins

    def predict(self, outputs: Tensor, size: tuple[int, int]) -> Tensor:
        """Depth maps [..., H, W] from per-patch outputs [..., h, w, n_bins]."""
        depth = outputs_to_depth(outputs, self.min_depth, self.max_depth, self.bins_strategy, self.norm_strategy)
        return upsample_depth(depth, size)

    def loss(self, outputs: Tensor, depth: Tensor) -> Tensor:
        return sig_loss(self.predict(outputs, depth.shape[-2:]), depth,
                        valid_depth(depth, self.min_depth, self.max_depth))

    def sums(self, outputs: Tensor, depth: Tensor) -> Tensor:
        """Per-image metric sums [G, N_SUMS] of G heads' outputs [G, B, h, w, n_bins] against depth [B, H, W]."""
        predicted = self.predict(outputs, depth.shape[-2:])
        return torch.stack([depth_sums(p, depth, self.min_depth, self.max_depth) for p in predicted])

    def scores(self, sums: Tensor) -> DepthScores:
        return depth_scores(sums)

    @staticmethod
    def headline(scores: DepthScores) -> float:
        return scores.rmse


Task = SegmentationTask | DepthTask


# ----------------------------------------------------------------------------- loading
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


def _batches(dataset: DenseDataset, indices: list[int], image_size: int, target_size: int | None,
             n_classes: int | None, batch_size: int, num_workers: int, problems: Problems, desc: str):
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


def _all_problems(dataset: DenseDataset, found: Problems) -> Problems:
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


def _features(featurizer: PatchFeaturizer, images: Tensor, device: torch.device, precision: str) -> Tensor:
    with torch.no_grad(), inference_autocast(device, precision):
        return featurizer(images.to(device, non_blocking=True)).float()


@dataclass
class TrainFeatures:
    """Patch features [N, h, w, F] of the train images and their targets at [N, S, S] (all ranks)."""

    features: Tensor
    masks: Tensor | None
    depth: Tensor | None
    skipped: dict[str, int]


def train_features(featurizer: PatchFeaturizer, dataset: DenseDataset, cfg: Any, n_classes: int | None,
                   device: torch.device) -> TrainFeatures:
    """Embed this rank's slice of the train images and all-gather the features and targets."""
    dense = cfg.dense
    problems = Problems()
    mine = [dataset.indices[i] for i in slice_of_rank(len(dataset.indices))]
    rows: dict[str, list[Tensor]] = {"features": [], "masks": [], "depth": []}
    for images, items in _batches(dataset, mine, dense.image_size, dense.image_size, n_classes, cfg.batch_size,
                                  cfg.num_workers, problems, "dense train features"):
        rows["features"].append(_features(featurizer, images, device, cfg.precision).cpu())
        for name, key in (("masks", "mask"), ("depth", "depth")):
            if items[0][key] is not None:
                rows[name].append(torch.stack([item[key] for item in items]))
    skipped = report_problems(_all_problems(dataset, problems), "train", len(dataset), dense.skip_bad_targets)
    size = dense.image_size
    if not rows["features"]:  # a rank without usable images still takes part in the gathers, with 0 rows
        rows["features"].append(_features(featurizer, torch.zeros(1, 3, size, size), device, cfg.precision)[:0].cpu())
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


# ----------------------------------------------------------------------------- fitting
@dataclass
class DenseHead:
    """A trained per-patch linear layer and the feature statistics its inputs are normalised with."""

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


def fit_dense_head(task: Task, features: Tensor, targets: Tensor, cfg: Any, seed: int = 0) -> DenseHead:
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
    val_scores = [task.headline(task.scores(s)) for s in sums]
    finite = [(s if math.isfinite(s) else -math.inf if task.higher_is_better else math.inf) for s in val_scores]
    best = int(np.argmax(finite) if task.higher_is_better else np.argmin(finite))
    weight, bias, mean, std = train(torch.arange(n), slice(best, best + 1))
    grid = [{"lr": lr, "weight_decay": wd, f"val_{'miou' if task.name == 'segmentation' else 'rmse'}": s}
            for (lr, wd), s in zip(points, val_scores)]
    return DenseHead(weight, bias, mean, std, lr=points[best][0], weight_decay=points[best][1],
                     val_score=val_scores[best], grid=grid, n_train=n, n_val=n_val)


# ----------------------------------------------------------------------------- scoring
@dataclass
class ProbeResult:
    """A dense probe's test scores, its chosen grid point and the whole grid."""

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


TARGET_KEY = {"segmentation": "mask", "depth": "depth"}


def score_dense_heads(featurizer: PatchFeaturizer, dataset: DenseDataset, heads: dict[str, tuple[Task, DenseHead]],
                      cfg: Any, n_classes: int | None, device: torch.device,
                      n_pictures: int) -> tuple[dict[str, Tensor], Problems, int, list[dict]]:
    """Each head's metric sums over the val images (this rank's slice, then all-reduced), the
    problems found, the number of images scored, and on rank 0 up to `n_pictures` pictures:
    {"image": RGB array, "mask" / "depth": (true, predicted)}."""
    problems = Problems()
    mine = [dataset.indices[i] for i in slice_of_rank(len(dataset.indices))]
    sums = {name: torch.zeros(n_classes, n_classes, dtype=torch.float64) if name == "segmentation"
            else torch.zeros(N_SUMS, dtype=torch.float64) for name in heads}
    n_scored, pictures = 0, []
    for images, items in _batches(dataset, mine, cfg.dense.image_size, None, n_classes, cfg.batch_size,
                                  cfg.num_workers, problems, "dense val features"):
        features = _features(featurizer, images, device, cfg.precision)
        drawn = items[:max(n_pictures - len(pictures), 0)] if rank() == 0 else []
        new_pictures = [{"image": item["picture"]} for item in drawn]
        for name, (task, head) in heads.items():
            key = TARGET_KEY[name]
            outputs = head.outputs(features)
            sums[name] += _batch_sums(task, outputs, [item[key].to(device) for item in items]).cpu().double()
            for i, (item, picture) in enumerate(zip(drawn, new_pictures)):
                picture[key] = (item[key].numpy(), task.predict(outputs[i], tuple(item[key].shape)).cpu().numpy())
        pictures += new_pictures
        n_scored += len(items)
    for name in sums:
        all_reduce_sum(sums[name])
    total = all_reduce_sum(torch.tensor([n_scored], dtype=torch.float64))
    return sums, _all_problems(dataset, problems), int(total), pictures


# ----------------------------------------------------------------------------- the protocol
def tasks_of(dataset: DenseDataset, cfg: Any, n_classes: int | None) -> dict[str, Task]:
    tasks: dict[str, Task] = {}
    if dataset.has_masks:
        tasks["segmentation"] = SegmentationTask(n_classes, cfg.ignore_index)
    if dataset.has_depth:
        tasks["depth"] = DepthTask(cfg.depth_n_bins, cfg.min_depth, cfg.max_depth, cfg.bins_strategy,
                                   cfg.norm_strategy)
    return tasks


def evaluate_dense(featurizer: PatchFeaturizer, train: DenseDataset, val: DenseDataset, cfg: Any,
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
        targets = data.masks if name == "segmentation" else data.depth
        heads[name] = (task, fit_dense_head(task, data.features.to(device), targets.to(device), dense, seed))
        log.info("dense %s probe: lr %g, weight decay %g chosen (held-out score %.3f)", name, heads[name][1].lr,
                 heads[name][1].weight_decay, heads[name][1].val_score)
    sums, problems, n_test, pictures = score_dense_heads(featurizer, val, heads, cfg, n_classes, device, n_pictures)
    result = DenseResult(n_classes=n_classes, pictures=pictures, skipped={
        "train": data.skipped, "val": report_problems(problems, "val", len(val), dense.skip_bad_targets)})
    for name, (task, head) in heads.items():
        probe = ProbeResult(scores=task.scores(sums[name]).as_dict(), lr=head.lr, weight_decay=head.weight_decay,
                            val_score=head.val_score, n_train=head.n_train - head.n_val, n_val=head.n_val,
                            n_test=n_test, grid=head.grid)
        setattr(result, name, probe)
    return result


def backbone_patches(model: nn.Module, cfg: Any) -> BackbonePatches:
    return BackbonePatches(model, cfg.dense.backbone_out_layers, cfg.dense.use_cls_token)


def evaluate_dense_backbone(model: nn.Module, train: DenseDataset, val: DenseDataset, cfg: Any,
                            device: torch.device | None = None, seed: int = 0, n_pictures: int = 0) -> DenseResult:
    """`evaluate_dense` on a backbone's patch tokens; the model's train/eval mode is restored afterwards."""
    device = device or default_device()
    was_training = model.training
    model = model.to(device).eval()
    try:
        return evaluate_dense(backbone_patches(model, cfg), train, val, cfg, device, seed, n_pictures)
    finally:
        model.train(was_training)


def online_dense(model: nn.Module, datasets: tuple[DenseDataset, DenseDataset], cfg: Any,
                 device: torch.device | None = None) -> dict[str, float]:
    """The dense probes during training (every eval.online_dense_period_iterations): the metrics to log."""
    return evaluate_dense_backbone(model, *datasets, cfg, device).metrics()
