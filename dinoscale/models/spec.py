"""`BackboneSpec`: every resolved architecture choice of a VisionTransformer, in one record.

Each field is declared once, with the documentation and allowed values of its `student.*` config
knob (`dinoscale.models.config.StudentConfig` is derived from these fields), so a spec converts to
and from config and checkpoint metadata without renaming. The defaults are DINOv2's training
recipe; presets and config fields override them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from dinoscale.errors import ConfigError
from dinoscale.models.attention import BACKENDS
from dinoscale.models.layers import NORM_EPS, SWIGLU_ALIGN

FFN_LAYERS = ("mlp", *SWIGLU_ALIGN)
POS_EMBED_TYPES = ("learned", "rope")
NORMALIZE_COORDS = ("min", "max", "separate")
SPEC_DEFAULT = "spec default"  # an arch_field's config knob defaults to the spec's default
NOT_A_KNOB = "not a knob"  # a field that the `student` config section does not expose


def arch_field(default: Any, help: str, *, student: Any = SPEC_DEFAULT, choices: Sequence[Any] | None = None,
               min: float | None = None, max: float | None = None) -> Any:
    """A BackboneSpec field with its `student.*` config knob, whose default is the spec's (`SPEC_DEFAULT`)
    or `student` (None: the preset's value); `student=NOT_A_KNOB` leaves the field out of the config."""
    return field(default=default, metadata={"help": help, "choices": choices, "min": min, "max": max,
                                            "student": student})


@dataclass(frozen=True)
class BackboneSpec:
    arch: str = arch_field("custom", "backbone preset (see `dinoscale models`)", student="vit_small")
    patch_size: int = arch_field(16, "patch size in pixels", min=1)
    img_size: int = arch_field(224, "native resolution the position embedding is made for", min=1)
    in_chans: int = arch_field(3, "image channels", student=NOT_A_KNOB)
    embed_dim: int = arch_field(384, "override the preset's width", student=None, min=1)
    depth: int = arch_field(12, "override the preset's number of blocks", student=None, min=1)
    num_heads: int = arch_field(6, "override the preset's number of attention heads", student=None, min=1)
    ffn_layer: str = arch_field("mlp", "feed-forward block (null: the preset's)", student=None, choices=FFN_LAYERS)
    ffn_ratio: float = arch_field(4.0, "hidden width of the feed-forward block / embed_dim (null: the preset's)",
                                  student=None, min=0.0)
    n_storage_tokens: int = arch_field(0, "register tokens, DINOv2 `num_register_tokens` (null: the preset's)",
                                       student=None, min=0)
    pos_embed_type: str = arch_field("learned", "absolute learned embedding (DINOv2) or 2-D axial RoPE (DINOv3); "
                                                "null: the preset's", student=None, choices=POS_EMBED_TYPES)
    pos_embed_rope_base: float | None = arch_field(100.0, "RoPE period base", min=0.0)
    pos_embed_rope_min_period: float | None = arch_field(None, "RoPE minimum period (instead of base)")
    pos_embed_rope_max_period: float | None = arch_field(None, "RoPE maximum period (instead of base)")
    pos_embed_rope_normalize_coords: str = arch_field("separate", "how patch coordinates are normalised to [-1, 1]",
                                                      choices=NORMALIZE_COORDS)
    pos_embed_rope_shift_coords: float | None = arch_field(None, "training-time random shift of RoPE coordinates "
                                                                 "(null: the preset's; 0 disables)")
    pos_embed_rope_jitter_coords: float | None = arch_field(None, "training-time random log-scale jitter per axis "
                                                                  "(null: the preset's; 1 disables)")
    pos_embed_rope_rescale_coords: float | None = arch_field(None, "training-time random log-scale rescale "
                                                                   "(null: the preset's; 1 disables)")
    interpolate_offset: float = arch_field(0.1, "offset of the bicubic position-embedding interpolation, DINOv2 "
                                                "(null: the preset's)", student=None)
    interpolate_antialias: bool = arch_field(False, "antialias when interpolating the position embedding "
                                                    "(null: the preset's)", student=None)
    norm_layer: str = arch_field("layernorm", "normalisation layer: layernorm (eps 1e-6, DINOv2), layernormbf16 "
                                              "(eps 1e-5, DINOv3) or rmsnorm (null: the preset's)", student=None,
                                 choices=tuple(NORM_EPS))
    layerscale: float | None = arch_field(1.0e-5, "LayerScale init value (null: the preset's; 0 disables)",
                                          student=None, min=0.0)
    drop_path_rate: float = arch_field(0.0, "stochastic depth rate", min=0.0, max=1.0)
    drop_path_uniform: bool = arch_field(True, "same drop-path rate in every block (else linear ramp)")
    qkv_bias: bool = arch_field(True, "bias on the qkv projection (null: the preset's)", student=None)
    proj_bias: bool = arch_field(True, "bias on the attention output projection")
    ffn_bias: bool = arch_field(True, "biases in the feed-forward block")
    mask_k_bias: bool = arch_field(False, "DINOv3: zero the key part of the qkv bias (null: the preset's)",
                                   student=None)
    untie_cls_and_patch_norms: bool = arch_field(False, "DINOv3: a separate final norm for CLS and storage tokens "
                                                        "(null: the preset's)", student=None)
    untie_global_and_local_cls_norm: bool = arch_field(False, "DINOv3: a separate final CLS norm for local crops in "
                                                              "training (null: the preset's)", student=None)
    attn_backend: str = arch_field("auto", "attention kernel", choices=BACKENDS)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            allowed = f.metadata["choices"]
            if allowed is not None and getattr(self, f.name) not in allowed:
                raise ConfigError(f"student.{f.name}={getattr(self, f.name)!r} (arch {self.arch}) is not allowed; "
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
