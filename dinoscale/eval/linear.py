"""Linear probe on frozen features with a learning-rate x weight-decay grid.

All grid points train at once as one batched linear layer [G, D, C] on cached features
(mini-batch SGD with momentum and a cosine schedule, as DINOv2's linear evaluation); the dense
probes train their per-patch linear layers with the same loop. The
grid point with the best accuracy on a validation split (held out from the training
features when none is given) is retrained on all training features and scored on the test split.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from dinoscale.errors import DataError

MOMENTUM = 0.9
INIT_STD = 0.01
EVAL_ROWS = 8192  # logits of G classifiers are scored in row blocks of this size


@dataclass
class LinearProbeResult:
    """The chosen grid point, its validation and test accuracies (percent) and the whole grid."""

    lr: float
    weight_decay: float
    val_top1: float
    test_top1: float
    test_top5: float
    n_train: int
    n_val: int
    n_test: int
    grid: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def stratified_split(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, held_out): about `fraction` of each class held out, at least one of any class with 2+ items."""
    generator = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_held = min(len(members) - 1, max(1, round(fraction * len(members))))
        held.append(members[:n_held])
        fit.append(members[n_held:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def linear_outputs(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Outputs [G, N, ..., C] of G linear maps (weight [G, D, C], bias [G, C]) on features [N, ..., D]."""
    grid, n_outputs = bias.shape
    return torch.einsum("n...d,gdc->gn...c", features, weight) + bias.view(grid, *[1] * (features.ndim - 1), n_outputs)


def train_linear_heads(features: torch.Tensor, targets: torch.Tensor, n_outputs: int, lrs: torch.Tensor,
                       weight_decays: torch.Tensor, epochs: int, batch_size: int,
                       loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Train G = len(lrs) linear maps jointly on features [N, ..., D]; grid point g uses lrs[g] and
    weight_decays[g]. `loss(outputs [G, B, ..., C], targets[batch])` gives each grid point's loss [G];
    their sum is minimised, so the grid points' gradients stay independent.

    Returns weights [G, D, C] and biases [G, C].
    """
    generator = torch.Generator().manual_seed(seed)
    n, dim = features.shape[0], features.shape[-1]
    grid = len(lrs)
    device = features.device
    weight = (torch.randn(grid, dim, n_outputs, generator=generator) * INIT_STD).to(device).requires_grad_()
    bias = torch.zeros(grid, n_outputs, device=device, requires_grad=True)
    momentum_w, momentum_b = torch.zeros_like(weight), torch.zeros_like(bias)
    lrs, weight_decays = lrs.to(device), weight_decays.to(device)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            batch = order[start:start + batch_size]
            grad_w, grad_b = torch.autograd.grad(loss(linear_outputs(features[batch], weight, bias),
                                                      targets[batch]).sum(), (weight, bias))
            scale = 0.5 * (1 + math.cos(math.pi * step / total_steps))
            with torch.no_grad():
                momentum_w.mul_(MOMENTUM).add_(grad_w + weight_decays[:, None, None] * weight)
                momentum_b.mul_(MOMENTUM).add_(grad_b)
                weight.sub_(scale * lrs[:, None, None] * momentum_w)
                bias.sub_(scale * lrs[:, None] * momentum_b)
            step += 1
    return weight.detach(), bias.detach()


def train_linear_classifiers(features: torch.Tensor, labels: torch.Tensor, n_classes: int, lrs: torch.Tensor,
                             weight_decays: torch.Tensor, epochs: int, batch_size: int,
                             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`train_linear_heads` on features [N, D] with cross-entropy against labels [N]."""
    def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        grid = logits.shape[0]
        return F.cross_entropy(logits.reshape(-1, n_classes), y.repeat(grid), reduction="none").view(grid, -1).mean(1)

    return train_linear_heads(features, labels, n_classes, lrs, weight_decays, epochs, batch_size, cross_entropy, seed)


@torch.no_grad()
def topk_accuracy(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  k: int = 1) -> torch.Tensor:
    """Top-k accuracy (percent) of each of the G classifiers: a tensor [G]."""
    correct = torch.zeros(weight.shape[0], device=features.device)
    for start in range(0, len(features), EVAL_ROWS):
        logits = linear_outputs(features[start:start + EVAL_ROWS], weight, bias)
        top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
        correct += (top == labels[None, start:start + EVAL_ROWS, None]).any(-1).sum(-1)
    return 100.0 * correct / len(features)


def feature_statistics(train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of each feature (the last dimension) over all other dimensions."""
    rows = train.reshape(-1, train.shape[-1])
    return rows.mean(0), rows.std(0).clamp_min(1e-6)


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Zero mean, unit variance per dimension with the training statistics (one lr grid fits any feature scale)."""
    mean, std = feature_statistics(train)
    return [(x - mean) / std for x in (train, *others)]


def _check(features: torch.Tensor, labels: torch.Tensor, name: str, dim: int | None = None) -> None:
    if features.ndim != 2 or len(features) != len(labels) or len(features) == 0:
        raise DataError(f"linear probe: {name} split needs N x D features with N labels, got "
                        f"{tuple(features.shape)} and {len(labels)} labels")
    if dim is not None and features.shape[1] != dim:
        raise DataError(f"linear probe: {name} features have width {features.shape[1]}, training features {dim}")


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, lrs: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1),
                 weight_decays: Sequence[float] = (0.0, 1e-4, 1e-2), epochs: int = 100, batch_size: int = 256,
                 val_fraction: float = 0.1, val_features: torch.Tensor | None = None,
                 val_labels: torch.Tensor | None = None, n_classes: int | None = None,
                 seed: int = 0) -> LinearProbeResult:
    """Choose (lr, weight decay) on the validation split, retrain on all training features, score on test."""
    _check(train_features, train_labels, "train")
    _check(test_features, test_labels, "test", train_features.shape[1])
    if not lrs or not weight_decays:
        raise DataError("linear probe: the grid is empty; set eval.linear_lrs and eval.linear_weight_decays")
    device = train_features.device
    train_x, train_y = train_features.float(), train_labels.long().to(device)
    if val_features is None:
        if not 0 < val_fraction < 1:
            raise DataError(f"linear probe: eval.linear_val_fraction must be in (0, 1), got {val_fraction}")
        fit_idx, val_idx = stratified_split(train_y.cpu(), val_fraction, seed)
        fit_x, fit_y = train_x[fit_idx.to(device)], train_y[fit_idx.to(device)]
        val_x, val_y = train_x[val_idx.to(device)], train_y[val_idx.to(device)]
        if len(val_y) == 0:
            raise DataError("linear probe: no class has 2+ training items to hold out for validation; "
                            "give a validation split or more labelled images")
    else:
        _check(val_features, val_labels, "validation", train_features.shape[1])
        fit_x, fit_y = train_x, train_y
        val_x, val_y = val_features.float().to(device), val_labels.long().to(device)
    test_x, test_y = test_features.float().to(device), test_labels.long().to(device)
    n_classes = n_classes or int(max(train_y.max(), val_y.max(), test_y.max())) + 1

    points = list(itertools.product(lrs, weight_decays))
    grid_lrs = torch.tensor([p[0] for p in points])
    grid_wds = torch.tensor([p[1] for p in points])
    fit_std, val_std = _standardise(fit_x, val_x)
    weight, bias = train_linear_classifiers(fit_std, fit_y, n_classes, grid_lrs, grid_wds, epochs, batch_size, seed)
    val_acc = topk_accuracy(val_std, val_y, weight, bias).cpu()
    best = int(val_acc.argmax())

    all_x = train_x if val_features is None else torch.cat([train_x, val_x])
    all_y = train_y if val_features is None else torch.cat([train_y, val_y])
    all_std, test_std = _standardise(all_x, test_x)
    weight, bias = train_linear_classifiers(all_std, all_y, n_classes, grid_lrs[best:best + 1],
                                            grid_wds[best:best + 1], epochs, batch_size, seed)
    return LinearProbeResult(
        lr=points[best][0], weight_decay=points[best][1], val_top1=float(val_acc[best]),
        test_top1=float(topk_accuracy(test_std, test_y, weight, bias, 1)[0]),
        test_top5=float(topk_accuracy(test_std, test_y, weight, bias, 5)[0]),
        n_train=len(all_y), n_val=len(val_y), n_test=len(test_y),
        grid=[{"lr": lr, "weight_decay": wd, "val_top1": float(a)} for (lr, wd), a in zip(points, val_acc)],
    )
