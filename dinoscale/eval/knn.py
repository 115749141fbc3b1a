"""Weighted k-NN classification on frozen features (the DINO protocol).

Features are L2-normalised; a query's k nearest bank items by cosine similarity vote for
their class with weight exp(sim / T). Neighbours are ordered by similarity, equal
similarities by bank index (lower first); classes with equal votes rank by class index.
The bank is scanned in chunks with a running top-k merge and queries are processed in
chunks, so similarity memory stays at about `query_chunk x bank_chunk` whatever the bank size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from dinoscale.errors import DataError


@dataclass
class KnnResult:
    """Accuracies in percent per k; `n_queries` items were classified."""

    top1: dict[int, float]
    top5: dict[int, float]
    n_queries: int

    def as_dict(self) -> dict:
        return asdict(self)


def _first_k_in_order(values: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, a mask of the k largest values; among equal values the leftmost win."""
    threshold = values.topk(k, dim=1).values[:, -1:]
    above = values > threshold
    at = values == threshold
    needed = k - above.sum(dim=1, keepdim=True)
    return above | (at & (at.cumsum(dim=1) <= needed))


def _top_k_columns(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and column positions of the k largest entries per row (ties at the k-th place: leftmost), unordered."""
    if k >= sims.shape[1]:
        return sims, torch.arange(sims.shape[1], device=sims.device).expand_as(sims)
    values, positions = sims.topk(k + 1, dim=1)
    # Only when the (k+1)-th value equals the k-th may topk have kept the wrong one of equal values.
    tied = (values[:, k - 1] == values[:, k]).nonzero().flatten()
    values, positions = values[:, :k].clone(), positions[:, :k].clone()
    if len(tied):
        exact = _first_k_in_order(sims[tied], k).nonzero()[:, 1].view(len(tied), k)
        positions[tied] = exact
        values[tied] = sims[tied].gather(1, exact)
    return values, positions


def _best_first(values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k entries per row ordered by decreasing value, equal values by increasing index."""
    order = indices.argsort(dim=1)
    values, indices = values.gather(1, order), indices.gather(1, order)
    order = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, order), indices.gather(1, order)


def knn_search(queries: torch.Tensor, bank: torch.Tensor, k: int, bank_chunk_size: int = 65536,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine neighbours of `queries` [Q, D] among `bank` [N, D] (both L2-normalised).

    Returns similarities and bank indices [Q, k], sorted by decreasing similarity, equal
    similarities by increasing index. The bank may live on another device (e.g. CPU); it is
    moved to the queries' device one chunk at a time.
    """
    k = min(k, bank.shape[0])
    best_sims = best_idx = None
    for start in range(0, bank.shape[0], bank_chunk_size):
        chunk = bank[start:start + bank_chunk_size].to(queries.device, queries.dtype, non_blocking=True)
        sims, positions = _top_k_columns(queries @ chunk.T, k)
        idx = positions + start
        if best_sims is not None:
            sims, idx = torch.cat([best_sims, sims], 1), torch.cat([best_idx, idx], 1)
        best_sims, best_idx = _best_first(sims, idx, k)
    return best_sims, best_idx


def knn_vote(neighbour_sims: torch.Tensor, neighbour_labels: torch.Tensor, n_classes: int,
             temperature: float) -> torch.Tensor:
    """Class scores [Q, C]: sum over neighbours of exp(sim / T) into each neighbour's class."""
    weights = (neighbour_sims.float() / temperature).exp()
    scores = torch.zeros(neighbour_sims.shape[0], n_classes, device=weights.device)
    return scores.scatter_add_(1, neighbour_labels, weights)


def _check_inputs(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                  test_labels: torch.Tensor, ks: Sequence[int], temperature: float) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise DataError(f"k-NN needs 2-D features of equal width; got bank {tuple(train_features.shape)} "
                        f"and queries {tuple(test_features.shape)}")
    if len(train_labels) != len(train_features) or len(test_labels) != len(test_features):
        raise DataError(f"k-NN: {len(train_features)} bank features with {len(train_labels)} labels, "
                        f"{len(test_features)} queries with {len(test_labels)} labels; they must match")
    if len(train_features) == 0 or len(test_features) == 0:
        raise DataError("k-NN needs a non-empty bank and at least one query; check the train/val datasets")
    if not ks or min(ks) < 1:
        raise DataError(f"k-NN k values must be positive integers, got {list(ks)} (eval.knn_k)")
    if temperature <= 0:
        raise DataError(f"k-NN temperature must be > 0, got {temperature} (eval.knn_temperature)")


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07,
                 n_classes: int | None = None, query_chunk_size: int = 256,
                 bank_chunk_size: int = 65536) -> KnnResult:
    """Weighted k-NN top-1/top-5 accuracy (percent) of `test_features` against a labelled bank.

    Everything runs on the device of `test_features` (the bank is copied there once; only the
    similarity blocks are chunked). A k larger than the bank uses the whole bank.
    """
    _check_inputs(train_features, train_labels, test_features, test_labels, ks, temperature)
    device = test_features.device
    bank = F.normalize(train_features.to(device).float(), dim=1)
    bank_labels = train_labels.long().to(device)
    n_classes = n_classes or int(max(train_labels.max(), test_labels.max())) + 1
    max_k = max(ks)
    correct1 = {k: 0 for k in ks}
    correct5 = {k: 0 for k in ks}
    for start in range(0, len(test_features), query_chunk_size):
        queries = F.normalize(test_features[start:start + query_chunk_size].float(), dim=1)
        targets = test_labels[start:start + query_chunk_size].long().to(device)
        sims, idx = knn_search(queries, bank, max_k, bank_chunk_size)
        labels = bank_labels[idx]
        for k in ks:
            scores = knn_vote(sims[:, :k], labels[:, :k], n_classes, temperature)
            ranked = scores.argsort(dim=1, descending=True, stable=True)[:, :min(5, n_classes)]
            hits = ranked == targets[:, None]
            correct1[k] += int(hits[:, 0].sum())
            correct5[k] += int(hits.any(dim=1).sum())
    n = len(test_features)
    return KnnResult(top1={k: 100.0 * c / n for k, c in correct1.items()},
                     top5={k: 100.0 * c / n for k, c in correct5.items()}, n_queries=n)
