"""Lloyd's k-means iterations with Hamerly's bounds (2010): the same iterates, fewer distances.

Each point keeps an upper bound on the distance to its centroid and a lower bound on the
distance to every other centroid; when the centroids move, the bounds loosen by the moves. A
point whose upper bound stays below its lower bound and below half the distance from its
centroid to the nearest other centroid cannot change cluster and is not searched; only the
others go through faiss. In a few dimensions most points settle after a few iterations (the
five-ring toy: a fifth of the searches of plain Lloyd); in more dimensions the bounds seldom
hold, and once they leave more than 90% of the points to search, the fit goes on with plain
nearest-centroid searches. Above BOUNDS_MAX_DIM dimensions (embeddings) it starts with those:
there the two-nearest searches that set the bounds up cost more than the searches they save.

Those plain searches may run in bf16 (`search_precision="bfloat16"`, where the CPU has native
bf16 and faiss has no GPU): one bf16 GEMM and a max per chunk instead of faiss's float32 search
(the README's curation benchmark gives the speed-up). Rounding the dot products to bf16 sends
points that are almost equally close to two centroids to either one, which moves the means by a
fraction of those points' share; the callers' final assignments stay float32.

Centroid means are accumulated in float64. A cluster that empties keeps its centroid (as in Vo
et al.'s implementation; faiss would split a big cluster instead). Iterations stop early at a
fixed point, where more of them would change nothing.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from dinoscale.curation.faiss_utils import DEFAULT_CHUNK_ROWS, gpu_available, nearest_centroid, nearest_centroids
from dinoscale.utils.device import autocast_dtype

BOUNDED_SEARCH_LIMIT = 0.9
BOUNDS_MAX_DIM = 64
MEANS_CHUNK_ROWS = 2048  # the float64 copy of a chunk stays in cache (larger chunks sum slower)
BF16_SEARCH_CHUNK_ROWS = 4096  # a chunk's (rows, centroids) scores stay in cache


def lloyd(points: np.ndarray, centroids: np.ndarray, n_iter: int, search_precision: str = "float32") -> np.ndarray:
    """`n_iter` rounds of (assign every point to its nearest centroid, move each centroid to the
    mean of its points) from `centroids`; returns the float64 centroids after the last move.
    `search_precision`: "float32" (exact), or "bfloat16" for the plain searches above
    BOUNDS_MAX_DIM dimensions where bf16 is native (see the module docstring)."""
    x = np.ascontiguousarray(points, dtype=np.float32)
    c = np.array(centroids, dtype=np.float64)
    if len(c) == 1:
        return cluster_means(x, np.zeros(len(x), dtype=np.int64), c)
    if x.shape[1] > BOUNDS_MAX_DIM:
        search = _nearest_centroid_search(x, search_precision)
        return _plain_lloyd(x, c, n_iter, search, search(c))
    assignment, upper, lower = _two_nearest(x, c)
    for iteration in range(n_iter):
        moved = cluster_means(x, assignment, c)
        shift = np.sqrt(((moved - c) ** 2).sum(axis=1))
        c = moved
        if iteration == n_iter - 1 or not shift.any():
            break
        upper += shift[assignment]
        lower -= _largest_other_shift(shift, assignment)
        c32 = c.astype(np.float32)
        half_gap = 0.5 * np.sqrt(nearest_centroids(c32, c32, 2)[1][:, 1].astype(np.float64))
        bound = np.maximum(lower, half_gap[assignment])
        unsure = np.flatnonzero(upper > bound)
        upper[unsure] = _distances_to_own(x, c32, assignment, unsure)
        unsure = unsure[upper[unsure] > bound[unsure]]
        if len(unsure):
            assignment[unsure], upper[unsure], lower[unsure] = _two_nearest(x, c, unsure)
        if len(unsure) > BOUNDED_SEARCH_LIMIT * len(x):  # bounds that hold this seldom cost more than they save
            return _plain_lloyd(x, c, n_iter - iteration - 1, _nearest_centroid_search(x, "float32"), assignment)
    return c


def _plain_lloyd(x: np.ndarray, c: np.ndarray, n_iter: int, search: Callable[[np.ndarray], np.ndarray],
                 assignment: np.ndarray) -> np.ndarray:
    """`n_iter` rounds of Lloyd from `assignment`, the nearest centroid of each point among `c`;
    `search(centroids)` finds the nearest centroid of every point."""
    for iteration in range(n_iter):
        moved = cluster_means(x, assignment, c)
        settled = np.array_equal(moved, c)
        c = moved
        if iteration == n_iter - 1 or settled:
            break
        assignment = search(c)
    return c


def cluster_means(points: np.ndarray, assignment: np.ndarray, fallback: np.ndarray,
                  chunk_rows: int = MEANS_CHUNK_ROWS) -> np.ndarray:
    """Mean of each cluster's points, accumulated in float64; empty clusters keep `fallback`."""
    sums = torch.zeros(fallback.shape, dtype=torch.float64)
    for lo in range(0, len(points), chunk_rows):
        chunk = torch.from_numpy(np.asarray(points[lo:lo + chunk_rows], dtype=np.float64))
        sums.index_add_(0, torch.from_numpy(assignment[lo:lo + chunk_rows]), chunk)
    counts = np.bincount(assignment, minlength=len(fallback))
    means = np.array(fallback, dtype=np.float64)
    filled = counts > 0
    means[filled] = sums.numpy()[filled] / counts[filled, None]
    return means


def _two_nearest(x: np.ndarray, c: np.ndarray, rows: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest centroid of `rows`, the distance to it and to the second nearest (float64)."""
    ids, squared = nearest_centroids(x, c.astype(np.float32), 2, rows)
    distances = np.sqrt(np.maximum(squared.astype(np.float64), 0))
    return ids[:, 0], distances[:, 0], distances[:, 1]


def _largest_other_shift(shift: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """Per point, the largest move of a centroid other than its own."""
    second, first = np.argsort(shift)[-2:]
    return np.where(assignment == first, shift[second], shift[first])


def _distances_to_own(x: np.ndarray, c: np.ndarray, assignment: np.ndarray, rows: np.ndarray,
                      chunk_rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
    """Distance of each of `rows` to its own centroid."""
    points, centroids = torch.from_numpy(x), torch.from_numpy(c)
    out = np.empty(len(rows))
    for lo in range(0, len(rows), chunk_rows):
        part = torch.from_numpy(rows[lo:lo + chunk_rows])
        out[lo:lo + len(part)] = (points[part] - centroids[torch.from_numpy(assignment)[part]]).norm(dim=1).numpy()
    return out


def _nearest_centroid_search(x: np.ndarray, precision: str) -> Callable[[np.ndarray], np.ndarray]:
    """`search(centroids)`: the nearest centroid of every point."""
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"search precision {precision!r} is unknown; choose float32 or bfloat16")
    if precision == "bfloat16" and not gpu_available() and autocast_dtype(torch.device("cpu")) == torch.bfloat16:
        return _Bf16NearestCentroid(x)
    return lambda c: nearest_centroid(x, c.astype(np.float32))[0]


class _Bf16NearestCentroid:
    """argmin_j |x - c_j|^2 = argmax_j (x . c_j - |c_j|^2 / 2 - r(x)) for any per-point r, as one
    bf16 GEMM of [x, 1, 1, r] with [c, -b_hi, -b_lo, -1] (b_hi + b_lo: |c_j|^2 / 2 split into two
    bf16 numbers). The GEMM accumulates in float32 but rounds its result to bf16, relative to the
    result's size; with r the point's score against its centroid of the previous search, the
    results that compete for the maximum are close to 0 and keep their precision; only the dot
    products' inputs are rounded then. The first search has r = |x|^2 / 2: its results are
    -|x - c_j|^2 / 2, rounded relative to the squared distances."""

    def __init__(self, x: np.ndarray):
        n, d = x.shape
        self.points = torch.empty(n, d + 3, dtype=torch.bfloat16)
        self.points[:, :d] = torch.from_numpy(x)
        self.points[:, d:d + 2] = 1
        self.reference = torch.from_numpy(x).square().sum(dim=1) / 2

    def __call__(self, centroids: np.ndarray) -> np.ndarray:
        c = torch.from_numpy(centroids)
        half_sq_norm = (c * c).sum(dim=1) / 2
        high = half_sq_norm.bfloat16()
        low = (half_sq_norm - high.double()).bfloat16()
        minus_one = torch.full((len(c), 1), -1, dtype=torch.bfloat16)
        weights = torch.cat([c.bfloat16(), -high[:, None], -low[:, None], minus_one], dim=1).T.contiguous()
        self.points[:, -1] = self.reference
        reference = self.points[:, -1].float()  # the r the GEMM sees
        nearest = torch.empty(len(self.points), dtype=torch.int64)
        for start in range(0, len(self.points), BF16_SEARCH_CHUNK_ROWS):
            rows = slice(start, start + BF16_SEARCH_CHUNK_ROWS)
            best = torch.mm(self.points[rows], weights).max(dim=1)
            nearest[rows] = best.indices
            self.reference[rows] = best.values.float() + reference[rows]
        return nearest.numpy()
