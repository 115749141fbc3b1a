"""The pre-norm transformer block, with LayerScale and sample-dropping stochastic depth."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from dinoscale.models.attention import SelfAttention
from dinoscale.models.layers import LayerScale, make_ffn, make_norm

Rope = tuple[Tensor, Tensor] | None


class Block(nn.Module):
    """x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(x))).

    Stochastic depth follows DINOv2/DINOv3: in training each residual branch runs on a random
    subset of (1 - drop_path) of the batch and is added back scaled by batch / subset, so
    dropped samples cost no compute.
    """

    def __init__(self, dim: int, num_heads: int, *, ffn_layer: str, ffn_ratio: float, norm_layer: str,
                 layerscale: float | None, drop_path: float, qkv_bias: bool, proj_bias: bool, ffn_bias: bool,
                 mask_k_bias: bool, fused_swiglu: bool, attn_backend: str) -> None:
        super().__init__()
        self.norm1 = make_norm(norm_layer, dim)
        self.attn = SelfAttention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
                                  mask_k_bias=mask_k_bias, backend=attn_backend)
        self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.norm2 = make_norm(norm_layer, dim)
        self.mlp = make_ffn(ffn_layer, dim, ffn_ratio, bias=ffn_bias, fused_swiglu=fused_swiglu)
        self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x: Tensor | list[Tensor], rope: Rope | list[Rope] = None) -> Tensor | list[Tensor]:
        """One tensor (B, N, D), or a list of them (one per resolution) with one RoPE table each."""
        if isinstance(x, Tensor):
            return self._forward_one(x, rope)
        ropes = rope if rope is not None else [None] * len(x)
        return [self._forward_one(t, r) for t, r in zip(x, ropes)]

    def _forward_one(self, x: Tensor, rope: Rope) -> Tensor:
        if self.training and self.drop_path > 0.0:
            x = _add_residual_on_subset(x, lambda t: self.ls1(self.attn(self.norm1(t), rope)), self.drop_path)
            return _add_residual_on_subset(x, lambda t: self.ls2(self.mlp(self.norm2(t))), self.drop_path)
        x = _add_scaled(x, self.attn(self.norm1(x), rope), self.ls1)
        return _add_scaled(x, self.mlp(self.norm2(x)), self.ls2)


def _add_residual_on_subset(x: Tensor, branch: Callable[[Tensor], Tensor], drop_rate: float) -> Tensor:
    batch = x.shape[0]
    keep = max(int(batch * (1.0 - drop_rate)), 1)
    index = torch.randperm(batch, device=x.device)[:keep]
    residual = branch(x[index])
    return torch.index_add(x, 0, index, residual.to(x.dtype), alpha=batch / keep)


def _add_scaled(x: Tensor, residual: Tensor, layerscale: nn.Module) -> Tensor:
    """x + layerscale(residual), as one fused multiply-add when LayerScale is on."""
    if isinstance(layerscale, LayerScale):
        return torch.addcmul(x, residual, layerscale.gamma)
    return x + residual
