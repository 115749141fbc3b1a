"""`BackboneSpec`: every resolved architecture choice of a VisionTransformer, in one record.

Field names are those of the `student` config section (and of the reference configs), so a
spec converts to and from config and checkpoint metadata without renaming. The defaults are
DINOv2's training recipe; presets and config fields override them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from dinoscale.errors import ConfigError
from dinoscale.models.attention import BACKENDS
from dinoscale.models.layers import NORM_EPS, SWIGLU_ALIGN

FFN_LAYERS = ("mlp", *SWIGLU_ALIGN)
POS_EMBED_TYPES = ("learned", "rope")
NORMALIZE_COORDS = ("min", "max", "separate")


@dataclass(frozen=True)
class BackboneSpec:
    arch: str = "custom"
    patch_size: int = 16
    img_size: int = 224
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    ffn_layer: str = "mlp"
    ffn_ratio: float = 4.0
    n_storage_tokens: int = 0
    pos_embed_type: str = "learned"
    pos_embed_rope_base: float | None = 100.0
    pos_embed_rope_min_period: float | None = None
    pos_embed_rope_max_period: float | None = None
    pos_embed_rope_normalize_coords: str = "separate"
    pos_embed_rope_shift_coords: float | None = None
    pos_embed_rope_jitter_coords: float | None = None
    pos_embed_rope_rescale_coords: float | None = None
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    norm_layer: str = "layernorm"
    layerscale: float | None = 1.0e-5
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = True
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    mask_k_bias: bool = False
    untie_cls_and_patch_norms: bool = False
    untie_global_and_local_cls_norm: bool = False
    attn_backend: str = "auto"

    def __post_init__(self) -> None:
        for name, allowed in (("ffn_layer", FFN_LAYERS), ("pos_embed_type", POS_EMBED_TYPES),
                              ("norm_layer", tuple(NORM_EPS)), ("attn_backend", BACKENDS),
                              ("pos_embed_rope_normalize_coords", NORMALIZE_COORDS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"student.{name}={getattr(self, name)!r} (arch {self.arch}) is not allowed; "
                                  f"choose one of {', '.join(allowed)}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"student.embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads} "
                              f"(arch {self.arch}); change one of them")
        if self.pos_embed_type == "learned" and self.img_size % self.patch_size:
            raise ConfigError(f"student.img_size={self.img_size} is not a multiple of patch_size={self.patch_size}; "
                              "the learned position embedding needs a whole patch grid")

    @property
    def generation(self) -> str:
        """Which official checkpoint layout the parameters follow: learned position embedding -> DINOv2,
        RoPE -> DINOv3 (register tokens are `register_tokens` vs `storage_tokens`, SwiGLU weights
        `w12` vs `w1`/`w2`)."""
        return "dinov2" if self.pos_embed_type == "learned" else "dinov3"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any], source: str) -> "BackboneSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"unknown architecture fields {unknown} in {source}; known: {', '.join(sorted(known))}")
        return cls(**fields)

    def replace(self, **changes: Any) -> "BackboneSpec":
        return dataclasses.replace(self, **changes)
