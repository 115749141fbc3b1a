"""Building blocks of the ViT: patch embedding, LayerScale, feed-forward blocks and norms.

Parameter names follow the official DINOv2/DINOv3 checkpoints (`proj`, `gamma`, `fc1`/`fc2`,
`w12`/`w3` for DINOv2's fused SwiGLU, `w1`/`w2`/`w3` for DINOv3's).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from dinoscale.errors import ConfigError

NORM_EPS = {"layernorm": 1e-6, "layernormbf16": 1e-5, "rmsnorm": 1e-5}
SWIGLU_ALIGN = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: (B, C, H, W) -> (B, H/p * W/p, D)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        _, _, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ConfigError(
                f"image of {height}x{width} px is not a whole number of {p}x{p} patches; "
                f"use crop sizes that are multiples of student.patch_size={p}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_chans * self.patch_size**2)
        nn.init.uniform_(self.proj.weight, -bound, bound)
        nn.init.uniform_(self.proj.bias, -bound, bound)


class LayerScale(nn.Module):
    """Per-channel learnable scaling of a residual branch (CaiT)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden_dim(hidden_dim: int, align: int) -> int:
    """SwiGLU keeps the parameter count of an MLP of `hidden_dim`: 2/3 of it, rounded up to `align`."""
    d = int(hidden_dim * 2 / 3)
    return d + (-d % align)


class SwiGLUFFN(nn.Module):
    """silu(x W1) * (x W2) -> W3.

    `fused=True` stores W1 and W2 stacked as one `w12` matrix (DINOv2 layout, one matmul);
    `fused=False` keeps `w1` and `w2` apart (DINOv3 layout).
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True, fused: bool = True) -> None:
        super().__init__()
        self.fused = fused
        if fused:
            self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        else:
            self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
            self.w2 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w3 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            x1, x2 = self.w12(x).chunk(2, dim=-1)
        else:
            x1, x2 = self.w1(x), self.w2(x)
        return self.w3(F.silu(x1) * x2)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, with a learned per-channel weight."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with its weight and bias in the input's dtype: an fp32 residual stream is
    normalised in fp32 also when the parameters are gathered in bf16 (FSDP mixed precision)."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


def init_linear(linear: nn.Linear) -> None:
    """DINOv2's init of a linear layer: truncated normal weight (std 0.02), zero bias (and the key mask
    of a masked-key qkv projection)."""
    trunc_normal_(linear.weight, std=0.02)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    if hasattr(linear, "reset_bias_mask"):
        linear.reset_bias_mask()


def make_norm(kind: str, dim: int) -> nn.Module:
    """`layernorm` (eps 1e-6, DINOv2), `layernormbf16` (eps 1e-5, DINOv3) or `rmsnorm`."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=NORM_EPS[kind])
    return LayerNorm(dim, eps=NORM_EPS[kind])


def make_ffn(kind: str, dim: int, ratio: float, bias: bool, fused_swiglu: bool) -> nn.Module:
    """The feed-forward block named by `student.ffn_layer`."""
    hidden = int(dim * ratio)
    if kind == "mlp":
        return Mlp(dim, hidden, bias=bias)
    return SwiGLUFFN(dim, swiglu_hidden_dim(hidden, SWIGLU_ALIGN[kind]), bias=bias, fused=fused_swiglu)
