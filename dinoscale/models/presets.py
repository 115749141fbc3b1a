"""Named architectures and the mapping from the `student` config section to a backbone.

Two kinds of names are accepted in `student.arch`:

- the reference's size names (`vit_small`, `vit_base`, `vit_large`, `vit_so400m`, `vit_huge2`,
  `vit_giant2`, `vit_7b`): they set width, depth, heads (and the FFN ratio where the size
  fixes it); everything else comes from the config or DINOv2's recipe;
- the published backbones, named as on torch.hub (`dinov2_vits14`, `dinov2_vitg14_reg`,
  `dinov3_vits16plus`, `dinov3_vit7b16`, ...): their official architecture, as in
  facebookresearch/dinov2 and dinov3 `hub/backbones.py`, is the default of every field.

A config field that is set (not null) always overrides the preset. `student.patch_size` and
`student.img_size` are always set, so a training run uses the config's patch size and
resolution; a preset's own patch size and resolution (those of its official checkpoint) are
used by `load_backbone` and `describe_presets`.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from dinoscale.errors import ConfigError
from dinoscale.models.spec import BackboneSpec
from dinoscale.models.vit import VisionTransformer

SIZES: dict[str, dict[str, Any]] = {
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_so400m": dict(embed_dim=1152, depth=27, num_heads=18, ffn_ratio=3.777777778),
    "vit_huge2": dict(embed_dim=1280, depth=32, num_heads=20),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24),
    "vit_7b": dict(embed_dim=4096, depth=40, num_heads=32, ffn_ratio=3.0),
}

_DINOV2 = dict(patch_size=14, img_size=518, pos_embed_type="learned", norm_layer="layernorm",
               interpolate_offset=0.1, interpolate_antialias=False)
_DINOV2_REG = dict(_DINOV2, n_storage_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
_DINOV3 = dict(patch_size=16, img_size=224, pos_embed_type="rope", pos_embed_rope_base=100.0,
               pos_embed_rope_normalize_coords="separate", pos_embed_rope_rescale_coords=2.0,
               norm_layer="layernormbf16", n_storage_tokens=4, mask_k_bias=True, layerscale=1.0e-5)
_SWIGLU6 = dict(ffn_layer="swiglu", ffn_ratio=6.0)

PUBLISHED: dict[str, dict[str, Any]] = {
    "dinov2_vits14": dict(SIZES["vit_small"], **_DINOV2),
    "dinov2_vitb14": dict(SIZES["vit_base"], **_DINOV2),
    "dinov2_vitl14": dict(SIZES["vit_large"], **_DINOV2),
    "dinov2_vitg14": dict(SIZES["vit_giant2"], **_DINOV2, ffn_layer="swiglu"),
    "dinov2_vits14_reg": dict(SIZES["vit_small"], **_DINOV2_REG),
    "dinov2_vitb14_reg": dict(SIZES["vit_base"], **_DINOV2_REG),
    "dinov2_vitl14_reg": dict(SIZES["vit_large"], **_DINOV2_REG),
    "dinov2_vitg14_reg": dict(SIZES["vit_giant2"], **_DINOV2_REG, ffn_layer="swiglu"),
    "dinov3_vits16": dict(SIZES["vit_small"], **_DINOV3),
    "dinov3_vits16plus": dict(SIZES["vit_small"], **_DINOV3, **_SWIGLU6),
    "dinov3_vitb16": dict(SIZES["vit_base"], **_DINOV3),
    "dinov3_vitl16": dict(SIZES["vit_large"], **_DINOV3),
    "dinov3_vitl16plus": dict(SIZES["vit_large"], **_DINOV3, **_SWIGLU6),
    "dinov3_vith16plus": dict(SIZES["vit_huge2"], **_DINOV3, **_SWIGLU6),
    "dinov3_vit7b16": dict(SIZES["vit_7b"], **_DINOV3, ffn_layer="swiglu64", qkv_bias=False,
                           untie_global_and_local_cls_norm=True),
}

PRESETS: dict[str, dict[str, Any]] = {**SIZES, **PUBLISHED}


def preset_spec(name: str, **overrides: Any) -> BackboneSpec:
    """The spec of a named preset, with some fields replaced."""
    if name not in PRESETS:
        hint = difflib.get_close_matches(name, PRESETS, n=1)
        suggestion = f"did you mean '{hint[0]}'? " if hint else ""
        raise ConfigError(f"unknown student.arch '{name}'; {suggestion}presets: {', '.join(PRESETS)}")
    return BackboneSpec(arch=name, **{**PRESETS[name], **overrides})


def student_fields(student_cfg: Any) -> dict[str, Any]:
    """The `student` section (DictConfig, dataclass or mapping) as a plain dict."""
    if isinstance(student_cfg, DictConfig):
        return OmegaConf.to_container(student_cfg, resolve=True)  # type: ignore[return-value]
    if dataclasses.is_dataclass(student_cfg):
        return dataclasses.asdict(student_cfg)  # type: ignore[arg-type]
    if isinstance(student_cfg, Mapping):
        return dict(student_cfg)
    raise TypeError(f"expected the student config section, got {type(student_cfg).__name__}")


def resolve_spec(student_cfg: Any) -> BackboneSpec:
    """Preset of `student.arch`, overridden by every field of the section that is set."""
    fields = student_fields(student_cfg)
    spec_names = {f.name for f in dataclasses.fields(BackboneSpec)} - {"arch"}
    overrides = {k: v for k, v in fields.items() if k in spec_names and v is not None}
    return preset_spec(fields.get("arch", "vit_small"), **overrides)


def build_backbone(student_cfg: Any) -> VisionTransformer:
    """The student/teacher backbone described by the `student` config section (randomly initialised)."""
    return VisionTransformer(resolve_spec(student_cfg))
