"""Semantic segmentation for the dense probe: the loss on upsampled logits and the metrics.

As in the DINOv2/DINOv3 linear segmentation evaluation: logits predicted per patch are
upsampled bilinearly to the label map's size, trained with cross-entropy that skips the
ignore index, and scored by a confusion matrix over all test pixels (summed over ranks):
IoU per class = TP / (TP + FP + FN), mIoU their mean over the classes that occur in the
labels or the predictions, pixel accuracy = correct pixels / labelled pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def upsample(outputs: Tensor, size: tuple[int, int]) -> Tensor:
    """[..., h, w, C] per-patch outputs -> [..., C, H, W] at `size`, bilinear (align_corners=False)."""
    lead, (h, w, c) = outputs.shape[:-3], outputs.shape[-3:]
    maps = outputs.reshape(-1, h, w, c).permute(0, 3, 1, 2)
    if (h, w) != tuple(size):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    return maps.reshape(*lead, c, *size)


def segmentation_loss(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """Cross-entropy of each grid point's logits [G, B, h, w, C], upsampled to the labels [B, H, W]:
    the mean over labelled pixels, one value per grid point [G]."""
    grid = logits.shape[0]
    maps = upsample(logits, labels.shape[-2:])  # [G, B, C, H, W]
    per_pixel = F.cross_entropy(maps.flatten(0, 1), labels.repeat(grid, 1, 1), ignore_index=ignore_index,
                                reduction="none").view(grid, -1)
    n_labelled = (labels != ignore_index).sum().clamp_min(1)
    return per_pixel.sum(1) / n_labelled


def confusion_matrix(predicted: Tensor, labels: Tensor, n_classes: int, ignore_index: int) -> Tensor:
    """[C, C] int64 counts: row = true class, column = predicted class; ignored pixels are not counted."""
    labelled = labels != ignore_index
    pairs = labels[labelled].long() * n_classes + predicted[labelled].long()
    return torch.bincount(pairs, minlength=n_classes * n_classes).view(n_classes, n_classes)


@dataclass
class SegmentationScores:
    """Percentages; `iou` per class is None for a class absent from both the labels and the predictions."""

    miou: float
    pixel_accuracy: float
    mean_accuracy: float
    iou: list[float | None]

    def as_dict(self) -> dict:
        return asdict(self)


def segmentation_scores(confusion: Tensor) -> SegmentationScores:
    confusion = confusion.double()
    correct = confusion.diag()
    labelled, predicted = confusion.sum(1), confusion.sum(0)
    union = labelled + predicted - correct
    iou = torch.where(union > 0, correct / union.clamp_min(1), torch.nan)
    accuracy = torch.where(labelled > 0, correct / labelled.clamp_min(1), torch.nan)
    return SegmentationScores(
        miou=100 * float(iou.nanmean()), pixel_accuracy=100 * float(correct.sum() / confusion.sum().clamp_min(1)),
        mean_accuracy=100 * float(accuracy.nanmean()),
        iou=[None if torch.isnan(v) else 100 * float(v) for v in iou])


@dataclass
class SegmentationTask:
    """What the dense probe needs to train and score a segmentation head."""

    n_classes: int
    ignore_index: int
    name: str = "segmentation"
    target: str = "mask"
    selection_metric: str = "miou"
    higher_is_better: bool = True

    @property
    def n_outputs(self) -> int:
        return self.n_classes

    def loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        return segmentation_loss(outputs, labels.long(), self.ignore_index)

    def predict(self, outputs: Tensor, size: tuple[int, int]) -> Tensor:
        """Class maps [..., H, W] from per-patch logits [..., h, w, C]."""
        return upsample(outputs, size).argmax(-3)

    def empty_sums(self) -> Tensor:
        return torch.zeros(self.n_classes, self.n_classes, dtype=torch.float64)

    def sums(self, outputs: Tensor, labels: Tensor) -> Tensor:
        """Confusion matrices [G, C, C] of G heads' outputs [G, B, h, w, C] against labels [B, H, W]."""
        predicted = self.predict(outputs, labels.shape[-2:])
        return torch.stack([confusion_matrix(p, labels, self.n_classes, self.ignore_index) for p in predicted])

    def scores(self, sums: Tensor) -> SegmentationScores:
        return segmentation_scores(sums)
