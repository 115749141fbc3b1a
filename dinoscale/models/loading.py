"""Reading backbone weights from a local file, and writing dinoscale's own export.

`load_backbone` accepts:
- an official DINOv2 backbone (`dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`) or DINOv3 ViT
  backbone (`dinov3_vit*16*_pretrain_*.pth`) state dict; the generation is told by
  `pos_embed` vs `rope_embed.periods`, the size by the shapes, and register tokens, untied
  norms and the position-embedding grid by the keys present;
- a dinoscale export written by `save_backbone`: `{"format": "dinoscale-backbone",
  "arch_config": {...student fields...}, "model": <official-layout state dict>}` and, for a
  trained teacher, `"training": {"global_crops_size": ..., "local_crops_size": ...}` (what
  `read_training_record` reads, e.g. to evaluate at the training resolution) — the reference code can
  load `torch.load(f)["model"]` directly;
- a DINOv2 training checkpoint (`{"teacher": {"backbone.*": ...}}`, blocks possibly chunked as
  `blocks.<chunk>.<i>.`) or `{"model": state_dict}`.
Files are read with `torch.load(weights_only=True)` and loaded strictly. Nothing is downloaded.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from dinoscale.errors import CheckpointError, ConfigError
from dinoscale.models.pos_embed import interpolate_pos_embed
from dinoscale.models.presets import PUBLISHED, preset_spec, resolve_spec
from dinoscale.models.spec import BackboneSpec
from dinoscale.models.vit import VisionTransformer
from dinoscale.utils.io import atomic_path
from dinoscale.utils.logging import get_logger

EXPORT_FORMAT = "dinoscale-backbone"
RUNTIME_FIELDS = ("attn_backend", "drop_path_rate", "drop_path_uniform")
log = get_logger(__name__)


def load_backbone(path: str | os.PathLike, arch: str | Mapping[str, Any] | BackboneSpec | None = None,
                  ) -> VisionTransformer:
    """A VisionTransformer with the weights of `path`.

    arch: None to detect it from the file; a preset name (see `dinoscale models`); a `student`
    config section or dict of its fields; or a BackboneSpec. When `arch` is given and only the
    learned position embedding's grid differs, the file's embedding is resized to the model's.
    """
    state_dict, arch_config = _unwrap(_read(path), path)
    if arch is not None:
        spec = _spec_from_arch(arch)
        state_dict = _fit_pos_embed(state_dict, spec)
    elif arch_config is not None:
        try:
            spec = BackboneSpec.from_dict(arch_config, source=str(path))
        except ConfigError as err:
            raise CheckpointError(f"{path}: unreadable arch_config: {err}") from None
    else:
        spec = detect_spec(state_dict, path)
    model = meta_backbone(spec)
    diff = LayoutDiff.between(_shapes(model), state_dict)
    if diff.size:
        raise CheckpointError(f"{path}: the weights do not fit preset '{spec.arch}' ({spec.generation} layout): "
                              f"{diff}. Pass arch=<preset> matching the file (list: `dinoscale models`), "
                              "or check that the file holds a DINOv2/DINOv3 ViT backbone")
    # The file's tensors become the parameters: no random init, no second copy of a large model.
    float32 = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(float32, strict=True, assign=True)
    log.info("loaded %s weights from %s", spec.arch, path)
    return model


def save_backbone(model: VisionTransformer, path: str | os.PathLike,
                  state_dict: Mapping[str, Tensor] | None = None, training: Mapping[str, Any] | None = None) -> None:
    """Write the official-layout state dict and the architecture, atomically.

    state_dict: the full (unsharded) weights when `model` is sharded; defaults to the model's own.
    training: how the weights were trained (crop sizes), stored as the export's `training` record.
    """
    weights = state_dict if state_dict is not None else model.state_dict()
    arch_config = {k: v for k, v in model.spec.to_dict().items() if k not in RUNTIME_FIELDS}
    payload = {"format": EXPORT_FORMAT, "arch_config": arch_config,
               "model": {k: v.detach().cpu() for k, v in weights.items()}}
    if training is not None:
        payload["training"] = dict(training)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_training_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The `training` record of a dinoscale export (None for any other weights file). The file is
    memory-mapped, so its tensors are not read."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format torch file (e.g. a legacy official release): it records nothing
        return None
    record = obj.get("training") if isinstance(obj, Mapping) and obj.get("format") == EXPORT_FORMAT else None
    return dict(record) if isinstance(record, Mapping) else None


# ---------------------------------------------------------------------------- detection
def detect_spec(state_dict: Mapping[str, Tensor], source: Any = "state dict") -> BackboneSpec:
    """The published preset whose exact layout the weights have (register tokens, untied norms and
    the learned position-embedding grid are read from the file)."""
    for key in ("cls_token", "patch_embed.proj.weight", "mask_token"):
        if key not in state_dict:
            raise CheckpointError(f"{source}: no '{key}' entry, so this is not a DINOv2/DINOv3 ViT backbone "
                                  f"(first keys: {', '.join(list(state_dict)[:5])})")
    if "pos_embed" in state_dict:
        generation = "dinov2"
    elif "rope_embed.periods" in state_dict:
        generation = "dinov3"
    else:
        raise CheckpointError(f"{source}: neither 'pos_embed' (DINOv2) nor 'rope_embed.periods' (DINOv3) found; "
                              "not a known ViT backbone layout")
    embed_dim = state_dict["cls_token"].shape[-1]
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    observed = _observed_fields(state_dict, generation)
    candidates = [name for name, fields in PUBLISHED.items()
                  if name.startswith(generation) and fields["embed_dim"] == embed_dim and fields["depth"] == depth]
    if not candidates:
        raise CheckpointError(f"{source}: no {generation} preset has embed_dim={embed_dim} and depth={depth}; "
                              "pass arch=<student fields> describing the model, or load a dinoscale export")
    # Presets that need the fewest observed changes come first: a file with register tokens is
    # `*_reg` (whose interpolation settings differ too), not the plain preset plus registers.
    candidates.sort(key=lambda name: sum(getattr(preset_spec(name), k) != v for k, v in observed.items()))
    diffs = {name: LayoutDiff.between(_shapes(meta_backbone(preset_spec(name, **observed))), state_dict)
             for name in candidates}
    closest = min(diffs, key=lambda name: diffs[name].size)  # min keeps the first of equals
    if diffs[closest].size == 0:
        return preset_spec(closest, **observed)
    raise CheckpointError(f"{source}: the weights fit no {generation} preset; closest is '{closest}': "
                          f"{diffs[closest]}. Pass arch=<student fields> describing the model")


def _observed_fields(state_dict: Mapping[str, Tensor], generation: str) -> dict[str, Any]:
    """Architecture fields that official releases of one size vary in, read from the keys and shapes."""
    patch_weight = state_dict["patch_embed.proj.weight"]
    storage_key = "register_tokens" if generation == "dinov2" else "storage_tokens"
    fields: dict[str, Any] = {
        "patch_size": patch_weight.shape[-1],
        "in_chans": patch_weight.shape[1],
        "n_storage_tokens": state_dict[storage_key].shape[1] if storage_key in state_dict else 0,
        "untie_cls_and_patch_norms": "cls_norm.weight" in state_dict,
        "untie_global_and_local_cls_norm": "local_cls_norm.weight" in state_dict,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
    }
    if generation == "dinov2":
        side = math.isqrt(state_dict["pos_embed"].shape[1] - 1)
        fields["img_size"] = side * fields["patch_size"]
    return fields


def meta_backbone(spec: BackboneSpec) -> VisionTransformer:
    """The architecture without storage: load weights into it with `load_state_dict(..., assign=True)`."""
    with torch.device("meta"):
        return VisionTransformer(spec)


def _shapes(model: VisionTransformer) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@dataclass
class LayoutDiff:
    """How a state dict's keys and shapes differ from a model's."""

    missing: list[str]
    unexpected: list[str]
    mis_shaped: list[str]

    @classmethod
    def between(cls, expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, Tensor]) -> "LayoutDiff":
        return cls(
            missing=[k for k in expected if k not in state_dict],
            unexpected=[k for k in state_dict if k not in expected],
            mis_shaped=[f"{k}: file {tuple(state_dict[k].shape)} vs model {expected[k]}"
                        for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]],
        )

    @property
    def size(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.mis_shaped)

    def __str__(self) -> str:
        parts = [f"{label} {_clip(items)}" for label, items in
                 (("missing keys", self.missing), ("unexpected keys", self.unexpected),
                  ("shape mismatches", self.mis_shaped)) if items]
        return "; ".join(parts)


def _clip(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(f"'{i}'" for i in items[:limit])
    return f"[{shown}{f', ... (+{len(items) - limit} more)' if len(items) > limit else ''}]"


# ---------------------------------------------------------------------------- reading
def _read(path: str | os.PathLike) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file {path} does not exist; give the path of a local .pth file "
                              "(dinoscale never downloads weights)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file that is not a checkpoint
        raise CheckpointError(f"{path} cannot be read as a PyTorch weights file: {err}") from None


def _unwrap(obj: Any, path: Any) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """(state dict, arch_config or None) from any of the accepted file layouts."""
    arch_config = None
    if isinstance(obj, Mapping) and "arch_config" in obj and "model" in obj:
        arch_config, obj = dict(obj["arch_config"]), obj["model"]
    elif isinstance(obj, Mapping) and "teacher" in obj:
        obj = {k.removeprefix("backbone."): v for k, v in obj["teacher"].items() if k.startswith("backbone.")}
    elif isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors; expected an official DINOv2/DINOv3 "
                              "backbone file or a dinoscale export")
    # DINOv2 training runs chunk the blocks for FSDP: `blocks.<chunk>.<i>.` is block i.
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in obj.items()}, arch_config


def _spec_from_arch(arch: str | Mapping[str, Any] | BackboneSpec) -> BackboneSpec:
    if isinstance(arch, BackboneSpec):
        return arch
    if isinstance(arch, str):
        return preset_spec(arch)
    return resolve_spec(arch)


def _fit_pos_embed(state_dict: dict[str, Tensor], spec: BackboneSpec) -> dict[str, Tensor]:
    """Resize the file's learned position embedding to the grid of `spec`, as the forward pass would."""
    pos = state_dict.get("pos_embed")
    if spec.pos_embed_type != "learned" or pos is None or pos.dim() != 3:
        return state_dict
    grid = spec.img_size // spec.patch_size
    if pos.shape[1] == 1 + grid * grid or pos.shape[-1] != spec.embed_dim:
        return state_dict
    log.info("resizing pos_embed from %d to %d patches for %s", pos.shape[1] - 1, grid * grid, spec.arch)
    resized = interpolate_pos_embed(pos, grid, grid, spec.interpolate_offset, spec.interpolate_antialias)
    return {**state_dict, "pos_embed": resized}
