"""A model-free copy-detection descriptor for dedup: colour layout, gradient orientations, colour histogram.

Three classic global image descriptors, each L2-normalised, weighted and joined, all computed
on the RGB image in [0, 1] of side S that the embedding stage gives:

- colour layout: the image blurred (Gaussian, sigma S/32) and averaged on an 8x8 grid: where
  which colour is. Blurring makes it tolerate the few pixels a small crop or resize moves things.
- gradient orientations: on the blurred (sigma S/16) luminance, a histogram of 8 unsigned
  gradient orientations weighted by magnitude, per cell of a 4x4 grid (a coarse HOG, square-
  rooted): tells stripes from checks from dots of the same colours and layout.
- colour histogram: a 6x6x6 RGB histogram with trilinear soft binning, square-rooted (Hellinger):
  the palette, nearly unchanged by crops, resizes and re-encodes.

Near copies (re-encodes, resizes, crops of a few percent, brightness shifts of 10%) keep a
cosine above about 0.93 while different images with the same layout or palette fall below it
(measured on the synthetic pool; see configs/demo.yaml). On real pictures it is much weaker:
look-alike icons on white reach 0.98-0.99 while crops, captions and the same icon at another size
often fall below; `CALIBRATIONS` holds its precision/recall curve measured on real images, and
PDQ's (`PDQEmbedder`, Meta's perceptual hash made for copy detection), from which the defaults
and the working ranges are set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dinoscale.errors import ConfigError
from dinoscale.eval.features import IMAGENET_MEAN, IMAGENET_STD

LAYOUT_GRID = 8
GRADIENT_GRID, GRADIENT_BINS = 4, 8
COLOUR_BINS = 6
BLOCK_WEIGHTS = {"layout": 0.3, "gradients": 0.4, "colour": 0.3}
LUMA = (0.299, 0.587, 0.114)


class CopyDescriptorEmbedder:
    """Copy-detection descriptor rows for batches of ImageNet-normalised images (B, 3, S, S)."""

    def __init__(self, image_size: int):
        self.image_size = image_size
        self.dim = 3 * LAYOUT_GRID**2 + GRADIENT_BINS * GRADIENT_GRID**2 + COLOUR_BINS**3

    def __call__(self, images: Tensor) -> Tensor:
        return copy_descriptor(images)


def copy_descriptor(images: Tensor) -> Tensor:
    """(B, dim) L2-normalised descriptors of ImageNet-normalised images (B, 3, S, S)."""
    rgb = _rgb(images)
    side = rgb.shape[-1]
    luma = (rgb * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    blocks = {
        "layout": colour_layout(rgb, LAYOUT_GRID, side / 32),
        "gradients": gradient_histograms(luma, GRADIENT_GRID, GRADIENT_BINS, side / 16),
        "colour": colour_histogram(rgb, COLOUR_BINS),
    }
    joined = torch.cat([blocks[name] * math.sqrt(weight) for name, weight in BLOCK_WEIGHTS.items()], dim=1)
    return F.normalize(joined, dim=1)


def _rgb(images: Tensor) -> Tensor:
    """ImageNet-normalised images back to RGB in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp_(0, 1)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W) with edge replication; below sigma 0.3 unchanged."""
    if sigma < 0.3:
        return x
    radius = math.ceil(3 * sigma)
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=x.dtype) ** 2 / (2 * sigma**2))
    taps = (taps / taps.sum()).repeat(x.shape[1], 1, 1, 1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), taps.view(-1, 1, 1, 2 * radius + 1),
                 groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), taps.view(-1, 1, 2 * radius + 1, 1),
                    groups=x.shape[1])


def colour_layout(rgb: Tensor, grid: int, sigma: float) -> Tensor:
    """The blurred image averaged on a grid x grid layout, L2-normalised: (B, 3 * grid**2)."""
    return F.normalize(F.adaptive_avg_pool2d(gaussian_blur(rgb, sigma), grid).flatten(1), dim=1)


def gradient_histograms(luma: Tensor, grid: int, bins: int, sigma: float) -> Tensor:
    """Per cell of a grid x grid layout, the magnitude-weighted histogram of unsigned gradient
    orientations (each gradient split linearly between its two nearest bins), square-rooted and
    L2-normalised: (B, bins * grid**2). A flat image gives zeros."""
    padded = F.pad(gaussian_blur(luma, sigma), (1, 1, 1, 1), mode="replicate")
    gx = padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]
    gy = padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]
    magnitude = torch.sqrt(gx**2 + gy**2)
    position = torch.atan2(gy, gx).remainder(math.pi) * (bins / math.pi)
    lower = position.floor()
    upper_weight = position - lower
    lower = lower.long() % bins
    histogram = torch.zeros(luma.shape[0], bins, *luma.shape[-2:], dtype=luma.dtype)
    histogram.scatter_add_(1, lower, magnitude * (1 - upper_weight))
    histogram.scatter_add_(1, (lower + 1) % bins, magnitude * upper_weight)
    return F.normalize(F.adaptive_avg_pool2d(histogram, grid).flatten(1).sqrt(), dim=1)


def colour_histogram(rgb: Tensor, bins: int) -> Tensor:
    """bins**3 RGB histogram with bin centres at 0, 1/(bins-1), ..., 1 and trilinear soft binning,
    square-rooted so that it has unit L2 norm: (B, bins**3)."""
    position = rgb.flatten(2) * (bins - 1)  # (B, 3, pixels)
    lower = position.floor().clamp_(max=bins - 2)
    upper_weight = position - lower
    lower = lower.long()
    histogram = torch.zeros(rgb.shape[0], bins**3, dtype=rgb.dtype)
    for corner in range(8):
        step = [(corner >> channel) & 1 for channel in range(3)]
        index = torch.zeros_like(lower[:, 0])
        weight = torch.ones_like(upper_weight[:, 0])
        for channel in range(3):
            index = index * bins + lower[:, channel] + step[channel]
            weight = weight * (upper_weight[:, channel] if step[channel] else 1 - upper_weight[:, channel])
        histogram.scatter_add_(1, index, weight)
    return (histogram / (rgb.shape[-2] * rgb.shape[-1])).sqrt()


class PDQEmbedder:
    """Meta's PDQ perceptual hash (256 bits, made for copy detection) as a unit vector of +-1/16 per bit, so
    that cosine = 1 - 2 * hamming / 256 (PDQ's usual match distance 31 bits is cosine 0.758)."""

    dim = 256

    def __init__(self, image_size: int):
        try:
            import pdqhash
        except ImportError as err:
            raise ConfigError("the `pdq` copy-detection embedding needs the pdqhash package: pip install pdqhash") \
                from err
        self.image_size, self._compute = image_size, pdqhash.compute

    def __call__(self, images: Tensor) -> Tensor:
        rgb = _rgb(images).mul_(255).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        bits = np.stack([self._compute(np.ascontiguousarray(image))[0] for image in rgb])
        return torch.from_numpy(bits.astype(np.float32) * 2 - 1) / 16


@dataclass(frozen=True)
class Calibration:
    """Pairwise precision and recall of a model-free copy-detection embedding against the threshold, measured
    on the real-image set (`python -m benchmarks.bench_dedup_real`: 8,356 images, oxygen icons at 8-256 px,
    GNOME wallpapers and scikit-image photos, with planted copies; k=16), and the thresholds it works in:
    from the lowest at which precision reaches 0.9 up to the highest at which recall stays above 0.1.
    Below `refuse_below` precision is about 0.5 or unmeasured: most of what near dedup would remove
    is not a copy."""

    points: tuple[tuple[float, float, float], ...]  # (threshold, precision, recall)
    working_range: tuple[float, float]
    refuse_below: float

    def at(self, threshold: float) -> tuple[float, float]:
        """Precision and recall interpolated at `threshold` (clamped to the measured span)."""
        t, p, r = (np.array(column) for column in zip(*self.points))
        return float(np.interp(threshold, t, p)), float(np.interp(threshold, t, r))


CALIBRATIONS = {
    "descriptor": Calibration(((0.85, 0.284, 0.603), (0.90, 0.396, 0.645), (0.93, 0.561, 0.623), (0.95, 0.714, 0.558),
                               (0.97, 0.849, 0.448), (0.98, 0.911, 0.365), (0.99, 0.956, 0.250),
                               (0.995, 0.967, 0.176)), working_range=(0.98, 0.995), refuse_below=0.92),
    "pdq": Calibration(((0.5, 0.670, 0.376), (0.6, 0.735, 0.330), (0.7, 0.801, 0.279), (0.76, 0.861, 0.245),
                        (0.8, 0.884, 0.218), (0.85, 0.913, 0.180), (0.9, 0.940, 0.136), (0.95, 0.969, 0.078)),
                       working_range=(0.85, 0.9), refuse_below=0.5),
}
