"""The SSL meta-architecture: one step's loss terms and weights, gradients, EMA and Gram teachers,
and the single-process loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinoscale.config import load_config
from dinoscale.data.collate import collate_data_and_cast
from dinoscale.data.masking import MaskingGenerator
from dinoscale.errors import ConfigError
from dinoscale.train.schedules import build_schedules
from dinoscale.train.ssl import SSLMetaArch

TINY = ["student.embed_dim=32", "student.depth=2", "student.num_heads=2", "student.patch_size=8",
        "student.img_size=16", "crops.global_crops_size=16", "crops.local_crops_size=8", "crops.local_crops_number=3",
        "dino.head_n_prototypes=32", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
        "ibot.head_n_prototypes=24", "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16",
        "train.batch_size_per_gpu=4", "train.OFFICIAL_EPOCH_LENGTH=10", "optim.epochs=1"]
BATCH = 4


def tiny_cfg(*overrides: str):
    return load_config(None, TINY + list(overrides))


def make_batch(cfg, seed: int = 0, gram_size: int | None = None) -> dict:
    generator = torch.Generator().manual_seed(seed)
    g, loc = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    samples = []
    for _ in range(BATCH):
        sample = {"global_crops": [torch.randn(3, g, g, generator=generator) for _ in range(2)],
                  "local_crops": [torch.randn(3, loc, loc, generator=generator)
                                  for _ in range(cfg.crops.local_crops_number)]}
        if gram_size:
            sample["gram_teacher_crops"] = [torch.randn(3, gram_size, gram_size, generator=generator) for _ in range(2)]
        samples.append(sample)
    side = g // cfg.student.patch_size
    return collate_data_and_cast(samples, cfg.ibot.mask_ratio_min_max, cfg.ibot.mask_sample_probability,
                                 MaskingGenerator(side, max_num_patches=0.5 * side * side, min_num_patches=1),
                                 generator)


def model_of(cfg) -> SSLMetaArch:
    torch.manual_seed(0)
    return SSLMetaArch(cfg)


def forward_backward(model: SSLMetaArch, batch: dict, iteration: int):
    """One step at the teacher temperature the trainer's schedule gives for a global batch of BATCH."""
    return model.forward_backward(batch, iteration, build_schedules(model.cfg, BATCH).teacher_temperature(iteration))


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "centering"])
def test_forward_backward_weights_every_term_as_the_reference(centering):
    cfg = tiny_cfg(f"train.centering={centering}", "ibot.mask_sample_probability=1.0")
    total, metrics = forward_backward(model_of(cfg), make_batch(cfg), 0)
    n_local = 3
    # global: 2 cross-view pairs (same view ignored), local: 2 x 3 pairs
    expected_weights = {"dino_global_crops_loss": 2 / (2 + 2 * n_local), "dino_local_crops_loss": 2 * n_local / (2 + 2 * n_local),
                        "koleo_loss": 0.1 * 2, "ibot_loss": 1.0}
    for name, weight in expected_weights.items():
        assert metrics[f"{name}_weight"] == pytest.approx(weight)
        assert np.isfinite(metrics[name])
    expected_total = sum(weight * metrics[name] for name, weight in expected_weights.items())
    assert total.item() == pytest.approx(expected_total, rel=1e-5)
    assert "gram_loss" not in metrics
    assert metrics["teacher_temp"] == pytest.approx(cfg.teacher.warmup_teacher_temp)
    assert 0 <= metrics["teacher_entropy"] <= np.log(32) + 1e-4


def test_global_pairs_with_the_diagonal_and_no_local_crops():
    cfg = tiny_cfg("dino.global_ignore_diagonal=false", "crops.local_crops_number=0")
    _, metrics = forward_backward(model_of(cfg), make_batch(cfg), 0)
    assert metrics["dino_global_crops_loss_weight"] == pytest.approx(1.0)
    assert "dino_local_crops_loss" not in metrics


def test_only_student_parameters_receive_gradients():
    cfg = tiny_cfg("gram.use_loss=true", "ibot.mask_sample_probability=1.0")
    model = model_of(cfg)
    forward_backward(model, make_batch(cfg), 0)
    for name, param in model.student.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    frozen = list(model.teacher.parameters()) + list(model.gram_teacher.parameters())
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    assert not model.teacher.training and not model.gram_teacher.training and model.student.training


def test_update_teacher_is_an_exact_ema():
    model = model_of(tiny_cfg())
    with torch.no_grad():
        for param in model.student.parameters():
            param.add_(torch.randn_like(param))
    student = [p.detach().clone() for p in model.student.parameters()]
    teacher = [p.detach().clone() for p in model.teacher.parameters()]
    model.update_teacher(0.9)
    for s, t, new in zip(student, teacher, model.teacher.parameters()):
        torch.testing.assert_close(new, 0.9 * t + 0.1 * s, rtol=1e-6, atol=1e-7)
    kept = [p.detach().clone() for p in model.teacher.parameters()]
    model.update_teacher(1.0)
    assert all(torch.equal(k, p) for k, p in zip(kept, model.teacher.parameters()))


def test_teacher_starts_as_a_copy_of_the_student():
    model = model_of(tiny_cfg())
    for s, t in zip(model.student.parameters(), model.teacher.parameters()):
        assert torch.equal(s, t)


def test_gram_teacher_refresh_schedule_and_copy():
    cfg = tiny_cfg("gram.use_loss=true", "gram.it_first_update=2", "gram.update_frequency=3", "gram.max_updates=2")
    model = model_of(cfg)
    assert [i for i in range(12) if model.gram_update_due(i)] == [2, 5]
    with torch.no_grad():
        for param in model.teacher.backbone.parameters():
            param.add_(1.0)
    model.update_gram_teacher()
    for g, t in zip(model.gram_teacher.backbone.parameters(), model.teacher.backbone.parameters()):
        assert torch.equal(g, t)
    assert not model.gram_active(1) and model.gram_active(2)


def test_gram_loss_starts_with_the_gram_teacher_and_resizes_high_resolution_crops():
    cfg = tiny_cfg("gram.use_loss=true", "gram.it_first_update=1", "crops.gram_teacher_crops_size=32",
                   "gram.loss_weight=2.0")
    model = model_of(cfg)
    batch = make_batch(cfg, gram_size=32)
    _, before = forward_backward(model, batch, 0)
    assert "gram_loss" not in before
    total, after = forward_backward(model, batch, 1)
    assert after["gram_loss_weight"] == 2.0 and np.isfinite(after["gram_loss"]) and after["gram_loss"] > 0


def test_shared_ibot_head():
    cfg = tiny_cfg("ibot.separate_head=false", "ibot.mask_sample_probability=1.0")
    model = model_of(cfg)
    assert set(model.student.keys()) == {"backbone", "dino_head"}
    _, metrics = forward_backward(model, make_batch(cfg), 0)
    assert np.isfinite(metrics["ibot_loss"]) and metrics["ibot_loss"] > 0


def test_centering_centres_move_after_a_step():
    cfg = tiny_cfg("train.centering=centering", "ibot.mask_sample_probability=1.0")
    model = model_of(cfg)
    forward_backward(model, make_batch(cfg), 0)
    assert torch.count_nonzero(model.dino_loss.center) > 0 and torch.count_nonzero(model.ibot_patch_loss.center) > 0


def test_bad_gram_resize_option_fails_at_construction():
    with pytest.raises(ConfigError, match="antialias"):
        model_of(tiny_cfg("gram.use_loss=true", "gram.global_teacher_resize_method=nearest",
                          "gram.global_teacher_resize_antialias=true"))
