"""The SSL losses against their definitions, computed here with plain loops / numpy."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinoscale.errors import ConfigError
from dinoscale.losses import gram as gram_module
from dinoscale.losses import DINOLoss, GramLoss, KoLeoLoss, iBOTPatchLoss, resize_patch_grid, sinkhorn_knopp


def np_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def cross_entropy(target: np.ndarray, logits: np.ndarray, temp: float) -> float:
    """-sum_k target_k log softmax(logits / temp)_k for one sample."""
    return float(-(target * np.log(np_softmax(logits / temp))).sum())


# ----------------------------------------------------------------------------- DINO
@pytest.mark.parametrize("ignore_diagonal", [False, True])
def test_dino_loss_is_mean_cross_entropy_over_crop_pairs(ignore_diagonal):
    rng = np.random.default_rng(0)
    n_student, n_teacher, batch, k, student_temp = 3, 2, 4, 7, 0.1
    student = rng.normal(size=(n_student, batch, k))
    teacher = np_softmax(rng.normal(size=(n_teacher, batch, k)))
    losses = [cross_entropy(teacher[t, b], student[s, b], student_temp)
              for s in range(n_student) for t in range(n_teacher) for b in range(batch)
              if not (ignore_diagonal and s == t)]
    loss = DINOLoss(k, student_temp=student_temp)(torch.tensor(student), torch.tensor(teacher),
                                                 ignore_diagonal=ignore_diagonal)
    assert loss.item() == pytest.approx(np.mean(losses), rel=1e-5)


def test_dino_loss_runs_in_float32_under_bf16_autocast():
    rng = np.random.default_rng(1)
    student = torch.tensor(rng.normal(size=(2, 8, 16)), dtype=torch.float32)
    teacher = torch.softmax(torch.tensor(rng.normal(size=(2, 8, 16)), dtype=torch.float32), -1)
    loss_fn = DINOLoss(16)
    reference = loss_fn(student, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = loss_fn(student, teacher)
    assert autocast.dtype == torch.float32
    assert autocast.item() == pytest.approx(reference.item(), rel=1e-6)


def test_centering_uses_the_previous_centre_then_updates_it_by_ema():
    rng = np.random.default_rng(2)
    k, temp, momentum = 5, 0.04, 0.9
    first, second = rng.normal(size=(6, k)), rng.normal(size=(6, k))
    loss = DINOLoss(k, center_momentum=momentum, teacher_normalisation="centering")

    probs = loss.teacher_probs(torch.tensor(first), temp)
    np.testing.assert_allclose(probs.numpy(), np_softmax(first / temp), rtol=1e-5, atol=1e-7)
    center = (1 - momentum) * first.mean(axis=0)
    np.testing.assert_allclose(loss.center.numpy()[0], center, rtol=1e-5, atol=1e-7)

    probs = loss.teacher_probs(torch.tensor(second), temp)
    np.testing.assert_allclose(probs.numpy(), np_softmax((second - center) / temp), rtol=1e-4, atol=1e-7)
    center = momentum * center + (1 - momentum) * second.mean(axis=0)
    np.testing.assert_allclose(loss.center.numpy()[0], center, rtol=1e-5, atol=1e-7)


def test_no_normalisation_is_a_plain_tempered_softmax():
    logits = np.random.default_rng(3).normal(size=(4, 6))
    loss = DINOLoss(6, teacher_normalisation="none")
    probs = loss.teacher_probs(torch.tensor(logits), 0.5)
    np.testing.assert_allclose(probs.numpy(), np_softmax(logits / 0.5), rtol=1e-5)
    assert torch.count_nonzero(loss.center) == 0


def test_unknown_teacher_normalisation_is_a_config_error():
    with pytest.raises(ConfigError, match="train.centering"):
        DINOLoss(4, teacher_normalisation="sinkhorn")


def np_sinkhorn(logits: np.ndarray, temp: float, n_iterations: int) -> np.ndarray:
    """Alternate prototype (mass 1/K) and sample (mass 1/B) normalisation of exp(logits / T)."""
    q = np.exp(logits / temp).astype(np.float64)
    n, k = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(axis=0, keepdims=True) * k
        q /= q.sum(axis=1, keepdims=True) * n
    return q * n


def test_sinkhorn_knopp_rows_sum_to_one_and_match_the_definition():
    logits = np.random.default_rng(4).normal(size=(12, 8)) * 0.3
    q = sinkhorn_knopp(torch.tensor(logits, dtype=torch.float32), 0.1, n_iterations=3).numpy()
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(q, np_sinkhorn(logits, 0.1, 3), rtol=1e-4, atol=1e-7)


def test_sinkhorn_knopp_converges_to_uniform_prototype_marginals():
    n, k = 16, 4
    logits = np.random.default_rng(5).normal(size=(n, k))
    q = sinkhorn_knopp(torch.tensor(logits, dtype=torch.float32), 0.5, n_iterations=200).numpy()
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(q.sum(axis=0), n / k, rtol=1e-4)
    # with 3 iterations the marginals are already much closer to uniform than the softmax's
    softmax_marginals = np_softmax(logits / 0.5).sum(axis=0)
    q3 = sinkhorn_knopp(torch.tensor(logits, dtype=torch.float32), 0.5, n_iterations=3).numpy()
    assert np.abs(q3.sum(axis=0) - n / k).max() < 0.5 * np.abs(softmax_marginals - n / k).max()


def test_sinkhorn_knopp_is_finite_for_large_logits_and_low_temperature():
    logits = torch.tensor([[40.0, -40.0, 0.0], [38.0, 39.0, -5.0]])
    q = sinkhorn_knopp(logits, 0.04)
    assert torch.isfinite(q).all()
    np.testing.assert_allclose(q.sum(dim=1).numpy(), 1.0, rtol=1e-5)


# ----------------------------------------------------------------------------- iBOT
def test_ibot_loss_weights_each_image_equally_with_uneven_mask_counts():
    rng = np.random.default_rng(6)
    k, temp = 6, 0.1
    counts = [1, 4, 0, 2]  # masked tokens per image; image 2 has none
    student = rng.normal(size=(sum(counts), k))
    teacher = np_softmax(rng.normal(size=(sum(counts), k)))
    per_image, row = [], 0
    for count in counts:
        if count:
            per_image.append(np.mean([cross_entropy(teacher[r], student[r], temp) for r in range(row, row + count)]))
        row += count
    expected = sum(per_image) / len(counts)
    weights = torch.tensor([1.0 / c for c in counts for _ in range(c)])
    loss = iBOTPatchLoss(k, student_temp=temp)(torch.tensor(student), torch.tensor(teacher), weights, len(counts))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_ibot_centre_is_the_mean_over_masked_tokens():
    tokens = np.random.default_rng(7).normal(size=(9, 3))
    loss = iBOTPatchLoss(3, center_momentum=0.5, teacher_normalisation="centering")
    loss.teacher_probs(torch.tensor(tokens), 0.1)
    np.testing.assert_allclose(loss.center.numpy()[0], 0.5 * tokens.mean(axis=0), rtol=1e-5)


def test_ibot_with_no_masked_token_is_zero_and_leaves_the_centre():
    loss = iBOTPatchLoss(3, teacher_normalisation="centering")
    empty = torch.zeros(0, 3)
    probs = loss.teacher_probs(empty, 0.1)
    assert probs.shape == (0, 3) and torch.count_nonzero(loss.center) == 0
    assert loss(empty.requires_grad_(), probs, torch.zeros(0), n_images=4).item() == 0.0


# ----------------------------------------------------------------------------- KoLeo
def test_koleo_on_the_square_is_minus_log_of_the_side():
    points = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.0, -0.5]])  # normalised: a square
    assert KoLeoLoss()(points).item() == pytest.approx(-math.log(math.sqrt(2.0)), rel=1e-6)


def test_koleo_matches_brute_force_nearest_neighbours():
    x = np.random.default_rng(8).normal(size=(10, 5))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    distances = np.linalg.norm(unit[:, None] - unit[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    expected = -np.log(distances.min(axis=1)).mean()
    assert KoLeoLoss()(torch.tensor(x, dtype=torch.float32)).item() == pytest.approx(expected, rel=1e-5)


def test_koleo_of_a_batch_of_one_is_zero_with_zero_gradient():
    x = torch.randn(1, 8, requires_grad=True)
    loss = KoLeoLoss()(x)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_koleo_of_identical_vectors_is_finite():
    x = torch.ones(4, 8, requires_grad=True)
    loss = KoLeoLoss(eps=1e-8)(x)
    loss.backward()
    assert loss.item() == pytest.approx(-math.log(1e-8), rel=1e-6)
    assert torch.isfinite(x.grad).all()


def test_koleo_is_finite_in_bf16_autocast_with_duplicates():
    x = torch.cat([torch.randn(3, 16), torch.randn(1, 16).repeat(3, 1)]).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = KoLeoLoss()(x.to(torch.bfloat16))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------- Gram
def gram_loss_by_definition(student: torch.Tensor, teacher: torch.Tensor, normalized=True, img_level=True,
                            remove_neg=False, remove_only_teacher_neg=False) -> torch.Tensor:
    """The DINOv3 definition with both similarity matrices materialised, in float64."""
    def gram(f):
        f = f.double()
        if normalized:
            f = f / f.norm(dim=-1, keepdim=True)
        if not img_level:
            f = f.reshape(-1, f.shape[-1])
        return f @ f.transpose(-1, -2)

    gs, gt = gram(student), gram(teacher.detach())
    if remove_neg:
        gs, gt = gs.clamp_min(0), gt.clamp_min(0)
    elif remove_only_teacher_neg:
        gs = torch.where((gs < 0) & (gt < 0), 0.0, gs)
        gt = gt.clamp_min(0)
    return ((gs - gt) ** 2).mean()


def test_gram_loss_on_known_features():
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    # normalised teacher similarity off the diagonal is 1/sqrt(2), the student's 0: MSE = 2 * 0.5 / 4
    assert GramLoss(img_level=True)(student, teacher).item() == pytest.approx(0.25, rel=1e-6)


@pytest.mark.parametrize("img_level", [False, True])
@pytest.mark.parametrize("options", [dict(), dict(normalized=False), dict(remove_neg=True),
                                     dict(remove_only_teacher_neg=True)])
def test_gram_loss_and_its_gradient_match_the_definition(options, img_level, monkeypatch):
    # batch level: 36 x 36 similarities in blocks of 5 rows (the last one shorter)
    monkeypatch.setattr(gram_module, "GRAM_BLOCK_ELEMENTS", 5 * 36)
    generator = torch.Generator().manual_seed(9)
    student = torch.randn(4, 9, 3, generator=generator, requires_grad=True)
    teacher = torch.randn(4, 9, 3, generator=generator)
    loss = GramLoss(img_level=img_level, **options)(student, teacher)
    loss.backward()
    reference = student.detach().double().requires_grad_()
    expected = gram_loss_by_definition(reference, teacher, img_level=img_level, **options)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(student.grad, reference.grad.float(), rtol=1e-4, atol=1e-7)


def test_batch_level_gram_keeps_no_batch_sized_similarity_matrix_for_backward():
    student, teacher = torch.randn(4, 9, 3, requires_grad=True), torch.randn(4, 9, 3)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        GramLoss(img_level=False)(student, teacher)
    assert saved and max(saved) < 36 * 36


def test_gram_batch_level_differs_from_image_level():
    rng = np.random.default_rng(10)
    student, teacher = (torch.tensor(rng.normal(size=(2, 3, 4)), dtype=torch.float32) for _ in range(2))
    assert GramLoss(img_level=False)(student, teacher).item() != pytest.approx(
        GramLoss(img_level=True)(student, teacher).item(), rel=1e-3)


def test_gram_loss_sends_no_gradient_to_the_teacher():
    student = torch.randn(2, 4, 3, requires_grad=True)
    teacher = torch.randn(2, 4, 3, requires_grad=True)
    GramLoss()(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None


def test_gram_negative_options_are_exclusive():
    with pytest.raises(ConfigError, match="exclusive"):
        GramLoss(remove_neg=True, remove_only_teacher_neg=True)


def test_resize_patch_grid_nearest_repeats_each_patch_and_keeps_constants():
    grid = torch.arange(4.0).view(1, 4, 1).repeat(1, 1, 2)  # 2x2 grid, feature = patch index
    resized = resize_patch_grid(grid, (4, 4), method="nearest")
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]], dtype=torch.float32)
    assert torch.equal(resized[0, :, 0].view(4, 4), expected)
    constant = torch.full((2, 16, 3), 0.7)
    for method in ("bicubic", "bilinear"):
        out = resize_patch_grid(constant, (2, 2), method=method, antialias=True)
        assert out.shape == (2, 4, 3) and torch.allclose(out, torch.full_like(out, 0.7), atol=1e-6)
    assert resize_patch_grid(constant, (4, 4)) is constant


def test_resize_patch_grid_rejects_bad_options():
    with pytest.raises(ConfigError, match="global_teacher_resize_method"):
        resize_patch_grid(torch.zeros(1, 4, 1), (1, 1), method="area")
    with pytest.raises(ConfigError, match="antialias"):
        resize_patch_grid(torch.zeros(1, 4, 1), (1, 1), method="nearest", antialias=True)


# ----------------------------------------------------------------------------- two gloo ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, port: int, data: dict, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        half = data["logits"].shape[0] // 2
        mine = slice(rank * half, (rank + 1) * half)
        out = {"sinkhorn": sinkhorn_knopp(data["logits"][mine], 0.1)}
        centering = DINOLoss(data["logits"].shape[1], center_momentum=0.8, teacher_normalisation="centering")
        centering.teacher_probs(data["logits"][mine], 0.1)
        out["center"] = centering.center.clone()
        features = data["features"][rank * 2:(rank + 1) * 2]
        out["koleo_all"] = KoLeoLoss(distributed=True)(features)
        out["koleo_pairs"] = KoLeoLoss(distributed=True, ranks_per_group=1)(features)
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_distributed_reductions_match_one_process_on_the_whole_batch():
    generator = torch.Generator().manual_seed(0)
    data = {"logits": torch.randn(8, 5, generator=generator), "features": torch.randn(4, 6, generator=generator)}
    results = mp.Manager().dict()
    mp.spawn(_distributed_worker, args=(_free_port(), data, results), nprocs=2, join=True)

    whole = sinkhorn_knopp(data["logits"], 0.1)
    torch.testing.assert_close(torch.cat([results[0]["sinkhorn"], results[1]["sinkhorn"]]), whole)
    expected_center = 0.2 * data["logits"].mean(dim=0, keepdim=True)
    for rank in (0, 1):
        torch.testing.assert_close(results[rank]["center"], expected_center)
    # KoLeo over all ranks: the mean of the two rank losses is the one-process loss on 4 vectors
    koleo_all = (results[0]["koleo_all"] + results[1]["koleo_all"]) / 2
    torch.testing.assert_close(koleo_all, KoLeoLoss()(data["features"]))
    # groups of one rank: each rank only searches its own 2 vectors
    torch.testing.assert_close(results[1]["koleo_pairs"], KoLeoLoss()(data["features"][2:]))
