"""Parameter groups (layer-wise lr decay, patch-embedding multiplier, no decay on biases, norms and
tokens), the AdamW optimiser, and applying the schedules to it each iteration."""

from __future__ import annotations

import re
from typing import Any, Iterable

import torch
from torch import nn

from dinoscale.train.config import OptimConfig
from dinoscale.train.schedules import Schedules

# learned tokens and embeddings that sit before the first block (layer 0) and get no weight decay
EMBEDDING_NAMES = ("patch_embed", "pos_embed", "cls_token", "mask_token", "storage_tokens", "register_tokens")
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")
_BLOCK_INDEX = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def clean_param_name(name: str) -> str:
    """The parameter name without what activation checkpointing, compile or FSDP1 insert."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def layer_id(name: str, n_blocks: int) -> int:
    """0 for embeddings and tokens, i + 1 for block i, n_blocks + 1 for anything after the blocks."""
    first = name.split(".")[0]
    if first in EMBEDDING_NAMES:
        return 0
    match = _BLOCK_INDEX.search(name)
    return int(match.group(1)) + 1 if match else n_blocks + 1


def is_no_weight_decay(name: str) -> bool:
    return (name.endswith(".bias") or "norm" in name or "gamma" in name
            or any(token in name for token in EMBEDDING_NAMES if token != "patch_embed"))


def get_params_groups(student: nn.ModuleDict, layerwise_decay: float = 1.0,
                      patch_embed_lr_mult: float = 1.0) -> list[dict[str, Any]]:
    """One group per trainable parameter, named as dinov2's: params, name, lr_multiplier,
    wd_multiplier, is_last_layer. Layer-wise decay applies to sub-modules with `blocks` (backbones)."""
    groups = []
    for module_name, module in student.items():
        n_blocks = len(module.blocks) if hasattr(module, "blocks") else 0
        for raw_name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            name = clean_param_name(raw_name)
            lr_multiplier = layerwise_decay ** (n_blocks + 1 - layer_id(name, n_blocks)) if n_blocks else 1.0
            if name.startswith("patch_embed"):
                lr_multiplier *= patch_embed_lr_mult
            groups.append({
                "params": param,
                "name": f"{module_name}.{name}",
                "lr_multiplier": lr_multiplier,
                "wd_multiplier": 0.0 if is_no_weight_decay(name) else 1.0,
                "is_last_layer": "last_layer" in name,
            })
    return groups


def fuse_params_groups(groups: Iterable[dict[str, Any]],
                       keys: tuple[str, ...] = ("lr_multiplier", "wd_multiplier", "is_last_layer")) -> list[dict[str, Any]]:
    """Merge per-parameter groups that share the same multipliers (fewer optimiser groups)."""
    fused: dict[tuple, dict[str, Any]] = {}
    for group in groups:
        identity = tuple(group[k] for k in keys)
        entry = fused.setdefault(identity, {**{k: group[k] for k in keys}, "params": []})
        entry["params"].append(group["params"])
    return list(fused.values())


# devices with a fused AdamW kernel: one kernel per parameter group instead of a dozen per parameter
FUSED_ADAMW_DEVICES = ("cpu", "cuda")
# param-group settings that choose how the optimizer runs, not what it computes
IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


def build_optimizer(student: nn.ModuleDict, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the student's parameter groups; lr and weight decay are set by `apply_schedules`.

    A loaded state dict keeps this optimizer's implementation (see `keep_implementation`)."""
    groups = fuse_params_groups(get_params_groups(student, optim.layerwise_decay, optim.patch_embed_lr_mult))
    fused = True if next(student.parameters()).device.type in FUSED_ADAMW_DEVICES else None  # None: torch's choice
    optimizer = torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0,
                                  betas=(optim.adamw_beta1, optim.adamw_beta2), fused=fused)
    optimizer.register_load_state_dict_pre_hook(keep_implementation)
    return optimizer


def keep_implementation(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state dict's param groups with `optimizer`'s implementation settings: a checkpoint saved by
    the unfused AdamW (or on another device) would otherwise switch a resumed run to that path."""
    implementation = {k: optimizer.defaults[k] for k in IMPLEMENTATION_KEYS if k in optimizer.defaults}
    return {**state_dict, "param_groups": [{**group, **implementation} for group in state_dict["param_groups"]]}


def apply_schedules(optimizer: torch.optim.Optimizer, schedules: Schedules, iteration: int) -> dict[str, float]:
    """Set every group's lr and weight decay for `iteration`; returns the scheduled values."""
    values = {"lr": schedules.lr(iteration), "last_layer_lr": schedules.last_layer_lr(iteration),
              "weight_decay": schedules.weight_decay_at(iteration)}
    for group in optimizer.param_groups:
        lr = values["last_layer_lr"] if group["is_last_layer"] else values["lr"]
        group["lr"] = lr * group["lr_multiplier"]
        group["weight_decay"] = values["weight_decay"] * group["wd_multiplier"]
    return values


def clip_gradients(student: nn.ModuleDict, max_norm: float) -> dict[str, float]:
    """Clip each student sub-module's gradient norm separately, as the reference; returns the norms."""
    norms = {}
    for name, module in student.items():
        params = [p for p in module.parameters() if p.grad is not None]
        if params and max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            norms[name] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor under FSDP2
    if not norms:
        return {}
    return dict(zip(norms, torch.stack(list(norms.values())).tolist()))  # one host sync
