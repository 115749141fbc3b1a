"""Linear probe: separable features are learnt, random labels are not, grid points train independently."""

import math

import pytest
import torch
import torch.nn.functional as F

import dinoscale.eval.linear as linear_module
from dinoscale.errors import DataError
from dinoscale.eval.linear import linear_probe, stratified_split, train_linear_classifiers


def separable_split(n: int, generator: torch.Generator, true_weight: torch.Tensor, margin: float = 1.0):
    """Gaussian features labelled by argmax of a fixed linear map, keeping points at least `margin` from a boundary."""
    x = torch.randn(4 * n, true_weight.shape[0], generator=generator)
    logits = x @ true_weight
    top2 = logits.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]) > margin
    return x[keep][:n], logits[keep][:n].argmax(1)


def test_linearly_separable_features_reach_near_100_percent():
    g = torch.Generator().manual_seed(0)
    true_weight = torch.randn(24, 5, generator=g)
    train_x, train_y = separable_split(1500, g, true_weight)
    test_x, test_y = separable_split(500, g, true_weight)
    result = linear_probe(train_x, train_y, test_x, test_y, lrs=(1e-2, 1e-1), weight_decays=(0.0, 1e-3),
                          epochs=20, batch_size=128)
    assert result.test_top1 >= 97.0
    assert result.test_top5 == 100.0
    assert result.n_train == 1500 and result.n_test == 500 and result.n_val == pytest.approx(150, abs=5)


def test_random_labels_stay_near_chance():
    g = torch.Generator().manual_seed(1)
    n_classes = 4
    train_x, test_x = torch.randn(1500, 24, generator=g), torch.randn(1000, 24, generator=g)
    train_y = torch.randint(0, n_classes, (1500,), generator=g)
    test_y = torch.randint(0, n_classes, (1000,), generator=g)
    result = linear_probe(train_x, train_y, test_x, test_y, lrs=(1e-2, 1e-1), weight_decays=(0.0,), epochs=30)
    assert 15.0 < result.test_top1 < 35.0  # chance is 25%; 3 standard deviations of 1000 draws is ~4%


def test_chosen_point_is_the_best_on_validation():
    g = torch.Generator().manual_seed(2)
    true_weight = torch.randn(16, 3, generator=g)
    train_x, train_y = separable_split(400, g, true_weight, margin=0.2)
    test_x, test_y = separable_split(100, g, true_weight, margin=0.2)
    # a near-zero learning rate cannot move the classifiers away from their initialisation
    result = linear_probe(train_x, train_y, test_x, test_y, lrs=(1e-7, 0.1), weight_decays=(0.0, 1e-2), epochs=10)
    assert len(result.grid) == 4
    best = max(result.grid, key=lambda p: p["val_top1"])
    assert result.val_top1 == best["val_top1"]
    assert result.lr == 0.1
    assert max(p["val_top1"] for p in result.grid if p["lr"] == 1e-7) < 80.0


def test_batched_grid_equals_torch_sgd_per_point():
    """Each grid point follows torch.optim.SGD (momentum 0.9, weight decay on weights) with a cosine schedule."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    lrs, wds = torch.tensor([0.05, 0.2, 0.5]), torch.tensor([0.0, 0.01, 0.1])
    epochs = 12
    weights, biases = train_linear_classifiers(x, y, 3, lrs, wds, epochs=epochs, batch_size=64, seed=5)
    # same initialisation as the code under test: normal(0, 0.01) from a generator seeded with `seed`
    init = torch.randn(3, 8, 3, generator=torch.Generator().manual_seed(5)) * 0.01
    for point in range(3):
        weight = init[point].clone().requires_grad_()
        bias = torch.zeros(3, requires_grad=True)
        optimizer = torch.optim.SGD([{"params": [weight], "weight_decay": float(wds[point])},
                                     {"params": [bias], "weight_decay": 0.0}], lr=float(lrs[point]), momentum=0.9)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / epochs)))
        for _ in range(epochs):  # one full batch per epoch
            optimizer.zero_grad()
            F.cross_entropy(x @ weight + bias, y).backward()
            optimizer.step()
            schedule.step()
        torch.testing.assert_close(weights[point], weight.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(biases[point], bias.detach(), rtol=1e-4, atol=1e-6)


def test_stratified_split_holds_out_each_class():
    labels = torch.tensor([0] * 50 + [1] * 20 + [2] * 2 + [3])
    fit, held = stratified_split(labels, 0.1, seed=0)
    assert sorted(fit.tolist() + held.tolist()) == list(range(len(labels)))
    assert torch.bincount(labels[held], minlength=4).tolist() == [5, 2, 1, 0]


def test_explicit_validation_split_is_used():
    g = torch.Generator().manual_seed(4)
    true_weight = torch.randn(16, 3, generator=g)
    train_x, train_y = separable_split(300, g, true_weight)
    val_x, val_y = separable_split(60, g, true_weight)
    test_x, test_y = separable_split(100, g, true_weight)
    result = linear_probe(train_x, train_y, test_x, test_y, lrs=(0.1,), weight_decays=(0.0,), epochs=20,
                          val_features=val_x, val_labels=val_y)
    assert result.n_val == 60 and result.n_train == 360
    assert result.test_top1 > 90.0


def test_mismatched_inputs_raise_data_error():
    with pytest.raises(DataError, match="width"):
        linear_probe(torch.randn(20, 4), torch.zeros(20, dtype=torch.long), torch.randn(5, 3),
                     torch.zeros(5, dtype=torch.long), epochs=1)
    with pytest.raises(DataError, match="grid is empty"):
        linear_probe(torch.randn(20, 4), torch.zeros(20, dtype=torch.long), torch.randn(5, 4),
                     torch.zeros(5, dtype=torch.long), lrs=(), epochs=1)


def test_accuracy_in_row_blocks_equals_a_direct_count(monkeypatch):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(50, 6, generator=g), torch.randint(0, 7, (50,), generator=g)
    weight, bias = torch.randn(3, 6, 7, generator=g), torch.randn(3, 7, generator=g)
    monkeypatch.setattr(linear_module, "EVAL_ROWS", 7)
    for k in (1, 5):
        expected = [100.0 * sum(int(y[i]) in (x[i] @ weight[c] + bias[c]).topk(k).indices.tolist()
                                for i in range(50)) / 50 for c in range(3)]
        torch.testing.assert_close(linear_module.topk_accuracy(x, y, weight, bias, k), torch.tensor(expected))
