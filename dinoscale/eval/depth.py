"""Monocular depth for the dense probe: outputs to depth, the training loss and the metrics.

As in the DINOv2/DINOv3 linear depth evaluation: the linear layer predicts, per patch, weights
over `n_bins` depths spread over [min_depth, max_depth] (AdaBins' classification-regression;
one bin is plain regression, relu + min_depth); the depth map is upsampled bilinearly to the
ground truth's size and trained with the scale-invariant log loss (SigLoss: sqrt(Var g +
0.15 (mean g)^2), g = log pred - log gt). Pixels whose true depth lies outside (min_depth,
max_depth) are neither trained on nor scored. Metrics are computed per image on predictions
clamped to the range and averaged over images (the reference's protocol): RMSE, δ1 = share of
pixels with max(pred / gt, gt / pred) < 1.25, and the absolute relative error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dinoscale.eval.segmentation import upsample

SIGLOSS_MEAN_WEIGHT = 0.15
LOG_EPS = 1e-3  # keeps log() finite where a prediction reaches 0 (the reference's eps)
DELTA1_THRESHOLD = 1.25
N_SUMS = 4  # per-image RMSE, δ1 and absolute relative error summed, and the number of images


def depth_bins(n_bins: int, min_depth: float, max_depth: float, strategy: str = "linear") -> Tensor:
    if strategy == "linear":
        return torch.linspace(min_depth, max_depth, n_bins)
    if strategy == "log":
        return torch.linspace(torch.log(torch.tensor(min_depth)), torch.log(torch.tensor(max_depth)), n_bins).exp()
    raise ValueError(f"unknown bins strategy {strategy!r}")


def outputs_to_depth(outputs: Tensor, min_depth: float, max_depth: float, bins_strategy: str = "linear",
                     norm_strategy: str = "linear") -> Tensor:
    """[..., n_bins] linear outputs -> [...] depth: the bins weighted by the normalised outputs."""
    if outputs.shape[-1] == 1:
        return F.relu(outputs[..., 0]) + min_depth
    if norm_strategy == "linear":
        weights = F.relu(outputs) + 0.1
        weights = weights / weights.sum(-1, keepdim=True)
    elif norm_strategy == "softmax":
        weights = outputs.softmax(-1)
    elif norm_strategy == "sigmoid":
        weights = outputs.sigmoid()
        weights = weights / weights.sum(-1, keepdim=True)
    else:
        raise ValueError(f"unknown norm strategy {norm_strategy!r}")
    bins = depth_bins(outputs.shape[-1], min_depth, max_depth, bins_strategy).to(outputs.device, outputs.dtype)
    return weights @ bins


def upsample_depth(depth: Tensor, size: tuple[int, int]) -> Tensor:
    """[..., h, w] per-patch depth -> [..., H, W], bilinear."""
    return upsample(depth[..., None], size)[..., 0, :, :]


def valid_depth(gt: Tensor, min_depth: float, max_depth: float) -> Tensor:
    return torch.isfinite(gt) & (gt > min_depth) & (gt < max_depth)


def sig_loss(predicted: Tensor, gt: Tensor, valid: Tensor) -> Tensor:
    """SigLoss of each grid point's predictions [G, B, H, W] against gt [B, H, W] over the valid
    pixels of the whole batch: one value per grid point [G]."""
    g = (torch.log(predicted + LOG_EPS) - torch.log(gt + LOG_EPS)) * valid
    n = valid.sum().clamp_min(2)
    mean = g.flatten(1).sum(1) / n
    variance = ((g - mean[:, None, None, None]) ** 2 * valid).flatten(1).sum(1) / (n - 1)
    return (variance + SIGLOSS_MEAN_WEIGHT * mean ** 2).clamp_min(1e-12).sqrt()


def depth_sums(predicted: Tensor, gt: Tensor, min_depth: float, max_depth: float) -> Tensor:
    """[N_SUMS] float64: per-image RMSE, δ1 and absolute relative error of predictions [B, H, W]
    (clamped to the range) against gt [B, H, W], summed over the images that have valid pixels,
    and their number. Sums of several batches or ranks add up."""
    valid = valid_depth(gt, min_depth, max_depth)
    predicted = predicted.clamp(min_depth, max_depth).double()
    gt = torch.where(valid, gt, 1.0).double()
    count = valid.flatten(1).sum(1).double()
    has_pixels = count > 0
    count = count.clamp_min(1)

    def per_image_mean(values: Tensor) -> Tensor:
        return (values * valid).flatten(1).sum(1) / count

    rmse = per_image_mean((predicted - gt) ** 2).sqrt()
    delta1 = per_image_mean((torch.maximum(predicted / gt, gt / predicted) < DELTA1_THRESHOLD).double())
    abs_rel = per_image_mean((predicted - gt).abs() / gt)
    return torch.stack([rmse[has_pixels].sum(), delta1[has_pixels].sum(), abs_rel[has_pixels].sum(),
                        has_pixels.sum().double()])


@dataclass
class DepthScores:
    """Means over images: RMSE (depth units), δ1 (percent), absolute relative error."""

    rmse: float
    delta1: float
    abs_rel: float
    n_images: int

    def as_dict(self) -> dict:
        return asdict(self)


def depth_scores(sums: Tensor) -> DepthScores:
    n = float(sums[3])
    mean = sums[:3] / max(n, 1.0)
    return DepthScores(rmse=float(mean[0]), delta1=100 * float(mean[1]), abs_rel=float(mean[2]), n_images=int(n))


@dataclass
class DepthTask:
    """What the dense probe needs to train and score a depth head."""

    n_bins: int
    min_depth: float
    max_depth: float
    bins_strategy: str = "linear"
    norm_strategy: str = "linear"
    name: str = "depth"
    target: str = "depth"
    selection_metric: str = "rmse"
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

    def empty_sums(self) -> Tensor:
        return torch.zeros(N_SUMS, dtype=torch.float64)

    def sums(self, outputs: Tensor, depth: Tensor) -> Tensor:
        """Per-image metric sums [G, N_SUMS] of G heads' outputs [G, B, h, w, n_bins] against depth [B, H, W]."""
        predicted = self.predict(outputs, depth.shape[-2:])
        return torch.stack([depth_sums(p, depth, self.min_depth, self.max_depth) for p in predicted])

    def scores(self, sums: Tensor) -> DepthScores:
        return depth_scores(sums)
