"""Schedules (pure functions of the iteration) and the optimiser's parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dinoscale.config import load_config
from dinoscale.models.head import build_head
from dinoscale.models.presets import build_backbone
from dinoscale.train.optim import apply_schedules, build_optimizer, get_params_groups
from dinoscale.train.schedules import build_schedules, scaled_lr, warmup_cosine

EPOCH = 10
BASE = [f"train.OFFICIAL_EPOCH_LENGTH={EPOCH}", "optim.epochs=5", "optim.warmup_epochs=1", "optim.base_lr=0.004",
        "optim.min_lr=1e-6", "optim.weight_decay=0.04", "optim.weight_decay_end=0.4",
        "optim.freeze_last_layer_epochs=2", "teacher.momentum_teacher=0.992", "teacher.final_momentum_teacher=1.0",
        "teacher.warmup_teacher_temp=0.04", "teacher.teacher_temp=0.07", "teacher.warmup_teacher_temp_epochs=3"]


def test_warmup_cosine_values():
    kwargs = dict(peak=1.0, final=0.1, total_iterations=21, warmup_iterations=10, start=0.5)
    assert warmup_cosine(0, **kwargs) == 0.5
    assert warmup_cosine(5, **kwargs) == pytest.approx(0.75)
    assert warmup_cosine(10, **kwargs) == pytest.approx(1.0)  # warm-up end
    assert warmup_cosine(15, **kwargs) == pytest.approx(0.55)  # half-way down the cosine
    assert warmup_cosine(20, **kwargs) == pytest.approx(0.1)  # last iteration
    assert warmup_cosine(100, **kwargs) == 0.1
    values = [warmup_cosine(i, **kwargs) for i in range(10, 21)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_lr_scaling_rules():
    assert scaled_lr(0.004, 256, "sqrt_wrt_1024") == pytest.approx(0.004 * 0.5)
    assert scaled_lr(0.004, 512, "linear_wrt_256") == pytest.approx(0.008)
    assert scaled_lr(0.004, 512, "none") == 0.004


def test_schedule_values_at_warmup_end_and_last_step():
    schedules = build_schedules(load_config(None, BASE), global_batch_size=256)
    peak = 0.004 * math.sqrt(256 / 1024)
    last = 5 * EPOCH - 1
    assert schedules.lr(0) == 0.0
    assert schedules.lr(EPOCH) == pytest.approx(peak)
    assert schedules.lr(last) == pytest.approx(1e-6)
    assert schedules.weight_decay_at(0) == pytest.approx(0.04)
    assert schedules.weight_decay_at(last) == pytest.approx(0.4)
    assert schedules.teacher_momentum(0) == pytest.approx(0.992)
    assert schedules.teacher_momentum(last) == pytest.approx(1.0)
    assert schedules.teacher_temperature(0) == pytest.approx(0.04)
    assert schedules.teacher_temperature(15) == pytest.approx(0.055)
    assert schedules.teacher_temperature(3 * EPOCH) == pytest.approx(0.07)
    assert schedules.teacher_temperature(last) == pytest.approx(0.07)
    assert schedules.last_layer_lr(2 * EPOCH - 1) == 0.0
    assert schedules.last_layer_lr(2 * EPOCH) == pytest.approx(schedules.lr(2 * EPOCH))


def test_explicit_lr_overrides_the_scaling_rule():
    schedules = build_schedules(load_config(None, BASE + ["optim.lr=0.01"]), global_batch_size=64)
    assert schedules.lr(EPOCH) == pytest.approx(0.01)


def test_constant_after_warmup():
    schedules = build_schedules(load_config(None, BASE + ["optim.schedule=constant_after_warmup"]), 1024)
    assert schedules.lr(EPOCH // 2) == pytest.approx(0.002)
    assert schedules.lr(EPOCH) == schedules.lr(5 * EPOCH - 1) == pytest.approx(0.004)
    assert schedules.weight_decay_at(5 * EPOCH - 1) == pytest.approx(0.04)
    assert schedules.teacher_momentum(5 * EPOCH - 1) == pytest.approx(0.992)


# ----------------------------------------------------------------------------- parameter groups
DEPTH, DECAY, PATCH_MULT = 3, 0.5, 0.2


def tiny_student() -> nn.ModuleDict:
    cfg = load_config(None, ["student.embed_dim=32", f"student.depth={DEPTH}", "student.num_heads=2",
                             "student.patch_size=8", "student.img_size=16", "student.n_storage_tokens=2"])
    return nn.ModuleDict({"backbone": build_backbone(cfg.student),
                          "dino_head": build_head(32, 16, hidden_dim=32, bottleneck_dim=8, nlayers=2)})


def test_param_groups_layerwise_decay_and_no_weight_decay():
    groups = {g["name"]: g for g in get_params_groups(tiny_student(), DECAY, PATCH_MULT)}
    # block i gets decay^(depth - i); embeddings decay^(depth + 1), the patch embedding times its multiplier
    for i in range(DEPTH):
        assert groups[f"backbone.blocks.{i}.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(DECAY ** (DEPTH - i))
    assert groups["backbone.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(DECAY ** (DEPTH + 1) * PATCH_MULT)
    assert groups["backbone.cls_token"]["lr_multiplier"] == pytest.approx(DECAY ** (DEPTH + 1))
    assert groups["backbone.norm.weight"]["lr_multiplier"] == 1.0
    assert groups["dino_head.mlp.0.weight"]["lr_multiplier"] == 1.0
    no_decay = ["backbone.blocks.0.attn.qkv.bias", "backbone.blocks.1.norm1.weight", "backbone.norm.bias",
                "backbone.cls_token", "backbone.pos_embed", "backbone.mask_token", "backbone.register_tokens",
                "backbone.blocks.2.ls1.gamma"]
    for name in no_decay:
        assert groups[name]["wd_multiplier"] == 0.0, name
    for name in ["backbone.blocks.0.attn.qkv.weight", "backbone.patch_embed.proj.weight", "dino_head.mlp.0.weight"]:
        assert groups[name]["wd_multiplier"] == 1.0, name
    last_layer = {name for name, g in groups.items() if g["is_last_layer"]}
    assert last_layer == {"dino_head.last_layer.weight_v"}  # weight_g is frozen (no grad)


def test_apply_schedules_sets_lr_and_weight_decay_per_group():
    cfg = load_config(None, BASE + [f"optim.layerwise_decay={DECAY}", f"optim.patch_embed_lr_mult={PATCH_MULT}"])
    student = tiny_student()
    optimizer = build_optimizer(student, cfg.optim)
    schedules = build_schedules(cfg, 1024)
    values = apply_schedules(optimizer, schedules, 3 * EPOCH)
    for group in optimizer.param_groups:
        base = values["last_layer_lr"] if group["is_last_layer"] else values["lr"]
        assert group["lr"] == pytest.approx(base * group["lr_multiplier"])
        assert group["weight_decay"] == pytest.approx(values["weight_decay"] * group["wd_multiplier"])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(
        p.requires_grad for p in student.parameters())


def test_prototype_layer_is_frozen_during_the_first_epochs():
    cfg = load_config(None, BASE)
    student = tiny_student()
    optimizer = build_optimizer(student, cfg.optim)
    schedules = build_schedules(cfg, 1024)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    apply_schedules(optimizer, schedules, EPOCH + 1)  # after warm-up, inside the freeze
    student["dino_head"](student["backbone"](torch.randn(2, 3, 16, 16))).sum().backward()
    optimizer.step()
    after = dict(student.named_parameters())
    assert torch.equal(after["dino_head.last_layer.weight_v"], before["dino_head.last_layer.weight_v"])
    assert not torch.equal(after["dino_head.mlp.0.weight"], before["dino_head.mlp.0.weight"])
