"""2-D axial rotary position embedding (DINOv3).

Each head's channels are split in two halves that rotate as pairs (i, i + D/2); the first
quarter of the pairs turns with the row coordinate, the second with the column coordinate,
at periods `periods[j]`. Patch centres are normalised to [-1, 1], so the same angles
describe any resolution. During training the coordinates can be shifted, jittered per
axis and rescaled (log-uniformly) to make the model robust to position and scale.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dinoscale.errors import ConfigError


def rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1] on the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_apply(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate each channel pair (i, i + D/2) of `x` by the angle whose sin/cos are given."""
    return x * cos + rotate_half(x) * sin


def rope_sincos(coords: Tensor, periods: Tensor) -> tuple[Tensor, Tensor]:
    """sin and cos of the rotation angles for coordinates (N, 2) -> two (N, D_head) tables."""
    angles = 2 * math.pi * coords.unsqueeze(-1) / periods  # (N, 2, D_head/4)
    angles = angles.flatten(-2).tile(2)  # (N, D_head)
    return torch.sin(angles), torch.cos(angles)


class RopePositionEmbedding(nn.Module):
    """Produces the (sin, cos) tables for an H x W patch grid; no learned weights.

    The periods are a persistent buffer (`rope_embed.periods` in DINOv3 checkpoints): either
    `base ** (2j / (D_head/2))` or a geometric range from `min_period` to `max_period`.
    """

    def __init__(self, embed_dim: int, num_heads: int, base: float | None = 100.0,
                 min_period: float | None = None, max_period: float | None = None,
                 normalize_coords: str = "separate", shift_coords: float | None = None,
                 jitter_coords: float | None = None, rescale_coords: float | None = None) -> None:
        super().__init__()
        head_dim = embed_dim // num_heads
        if head_dim % 4:
            raise ConfigError(f"RoPE needs a head width divisible by 4; embed_dim/num_heads = {head_dim}. "
                              "Change student.embed_dim or student.num_heads")
        if (min_period is None) != (max_period is None):
            raise ConfigError("set both student.pos_embed_rope_min_period and pos_embed_rope_max_period, or neither")
        self.head_dim = head_dim
        self.base = None if min_period is not None else base
        self.min_period = min_period
        self.max_period = max_period
        self.normalize_coords = normalize_coords
        self.shift_coords = shift_coords
        self.jitter_coords = jitter_coords
        self.rescale_coords = rescale_coords
        self.register_buffer("periods", torch.empty(head_dim // 4), persistent=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        n = self.head_dim // 4
        with torch.no_grad():
            if self.base is not None:
                exponents = 2 * torch.arange(n, dtype=torch.float32, device=self.periods.device) / (self.head_dim // 2)
                self.periods.copy_(self.base**exponents)
            else:
                ratio = self.max_period / self.min_period
                exponents = torch.linspace(0, 1, n, dtype=torch.float32, device=self.periods.device)
                self.periods.copy_(ratio**exponents / ratio * self.max_period)

    @property
    def augments(self) -> bool:
        """Whether calls draw random coordinate augmentations (training with any of them set)."""
        return self.training and any(v is not None for v in (self.shift_coords, self.jitter_coords,
                                                              self.rescale_coords))

    def coords(self, height: int, width: int) -> Tensor:
        """Patch-centre coordinates in [-1, 1], (H*W, 2) in row-major order, with training augmentations."""
        dd = {"device": self.periods.device, "dtype": torch.float32}
        if self.normalize_coords == "max":
            rows = torch.arange(0.5, height, **dd) / max(height, width)
            cols = torch.arange(0.5, width, **dd) / max(height, width)
        elif self.normalize_coords == "min":
            rows = torch.arange(0.5, height, **dd) / min(height, width)
            cols = torch.arange(0.5, width, **dd) / min(height, width)
        else:
            rows = torch.arange(0.5, height, **dd) / height
            cols = torch.arange(0.5, width, **dd) / width
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        if not self.training:
            return coords
        if self.shift_coords is not None:
            coords = coords + torch.empty(2, **dd).uniform_(-self.shift_coords, self.shift_coords)
        if self.jitter_coords is not None:
            log_jitter = math.log(self.jitter_coords)
            coords = coords * torch.empty(2, **dd).uniform_(-log_jitter, log_jitter).exp()
        if self.rescale_coords is not None:
            log_rescale = math.log(self.rescale_coords)
            coords = coords * torch.empty(1, **dd).uniform_(-log_rescale, log_rescale).exp()
        return coords

    def forward(self, height: int, width: int) -> tuple[Tensor, Tensor]:
        return rope_sincos(self.coords(height, width), self.periods.float())
