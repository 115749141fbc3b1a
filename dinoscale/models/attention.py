"""Multi-head self-attention and the one function every attention call goes through.

Backends, all computing softmax(q k^T / sqrt(d)) v:
- `xformers`: xFormers' memory-efficient kernel (CUDA tensors only);
- `sdpa`: `torch.nn.functional.scaled_dot_product_attention`;
- `math`: two matmuls and a softmax.
`auto` picks xFormers on CUDA when it is installed, else SDPA on CUDA; on CPU it picks SDPA
for float32 and `math` for bfloat16/float16, because SDPA's CPU flash kernel is several times
slower than plain math in bf16 at ViT sequence lengths (see benchmarks/bench_models.py).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoscale.errors import ConfigError
from dinoscale.models.rope import rope_apply

BACKENDS = ("auto", "xformers", "sdpa", "math")


@functools.cache
def xformers_installed() -> bool:
    return importlib.util.find_spec("xformers") is not None


def check_backend(backend: str) -> None:
    """Fail early, at model build time, for a backend that cannot run here."""
    if backend not in BACKENDS:
        raise ConfigError(f"student.attn_backend={backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    if backend == "xformers" and not xformers_installed():
        raise ConfigError("student.attn_backend=xformers but xFormers is not installed; "
                          "install the `gpu` extra (pip install 'dinoscale[gpu]') or use attn_backend=auto")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend `auto` stands for, given where and in which precision attention runs."""
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "xformers" if xformers_installed() else "sdpa"
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return "math"
    return "sdpa"


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "auto") -> Tensor:
    """Scaled dot-product attention of (B, heads, N, d) tensors -> (B, heads, N, d)."""
    backend = resolve_backend(backend, q.device, q.dtype)
    if backend == "math":
        return _math_attention(q, k, v)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if not q.is_cuda:
        raise ConfigError("student.attn_backend=xformers runs on CUDA tensors only; use attn_backend=auto on CPU")
    from xformers.ops import memory_efficient_attention

    out = memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    batch, heads, n_tokens, head_dim = q.shape
    # Batched 3-D matmuls on contiguous copies: cheaper than letting 4-D matmul copy strided views,
    # and baddbmm folds the 1/sqrt(d) scale into the q k^T product.
    q3, k3, v3 = (t.reshape(batch * heads, -1, head_dim) for t in (q, k, v))
    scores = torch.baddbmm(q3.new_empty(1, 1, 1).expand(batch * heads, n_tokens, k3.shape[1]), q3,
                           k3.transpose(1, 2), beta=0.0, alpha=head_dim**-0.5)
    return torch.bmm(scores.softmax(dim=-1), v3).view(batch, heads, n_tokens, head_dim)


class MaskedKeyBiasLinear(nn.Linear):
    """The qkv projection of DINOv3: its bias is multiplied by `bias_mask`, which zeroes the key third."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if bias:
            self.register_buffer("bias_mask", torch.ones(out_features), persistent=True)
            self.reset_bias_mask()

    def reset_bias_mask(self) -> None:
        if self.bias is not None:
            third = self.out_features // 3
            with torch.no_grad():
                self.bias_mask.fill_(1)
                self.bias_mask[third:2 * third] = 0

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias * self.bias_mask.to(self.bias.dtype) if self.bias is not None else None
        return F.linear(x, self.weight, bias)


class SelfAttention(nn.Module):
    """Fused-qkv multi-head self-attention; RoPE, when given, rotates q and k of the patch tokens."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 mask_k_bias: bool = False, backend: str = "auto") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        qkv_cls = MaskedKeyBiasLinear if mask_k_bias else nn.Linear
        self.qkv = qkv_cls(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        batch, n_tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, n_tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, d)
        if rope is not None:
            q, k = apply_rope_to_patches(q, k, *rope)
        out = attention(q, k, v, self.backend)
        return self.proj(out.transpose(1, 2).reshape(batch, n_tokens, dim))


def apply_rope_to_patches(q: Tensor, k: Tensor, sin: Tensor, cos: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate the last `len(sin)` tokens (the patches) of q and k; CLS and storage tokens stay put.

    The rotation runs in the precision of the sin/cos tables (float32) and the result is
    cast back, so bf16 activations do not lose the position signal.
    """
    n_prefix = q.shape[-2] - sin.shape[-2]

    def rotate(t: Tensor) -> Tensor:
        patches = rope_apply(t[..., n_prefix:, :].to(sin.dtype), sin, cos).to(t.dtype)
        return torch.cat((t[..., :n_prefix, :], patches), dim=-2)

    return rotate(q), rotate(k)
