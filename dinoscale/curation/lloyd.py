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

The points may be spread over ranks (`points.Points`): each rank assigns its own blocks, and the
cluster sums are added up over ranks. They are exact integers, each coordinate scaled by one
power of two for the whole fit (chosen from the largest coordinate and the number of points so
that no sum can overflow an int64, about 2^-40 resolution for unit vectors) and rounded, so their
sum over ranks is the same in any order and the means (taken in float64) do not depend on the
world size. The bf16 searches run block by block, so each block's GEMMs have the same shapes on
any world size; the float32 searches are exact (`faiss_utils.nearest_centroids`). A cluster that
empties keeps its centroid (as in Vo et al.'s implementation; faiss would split a big cluster
instead). Iterations stop early at a fixed point, where more of them would change nothing.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from dinoscale.curation.faiss_utils import gpu_available, nearest_centroid, nearest_centroids, squared_distances
from dinoscale.curation.points import ClusterSums, Points, as_points
from dinoscale.utils.device import autocast_dtype

BOUNDED_SEARCH_LIMIT = 0.9
BOUNDS_MAX_DIM = 64
BF16_SEARCH_CHUNK_ROWS = 4096  # a chunk's (rows, centroids) scores stay in cache

Search = Callable[[np.ndarray], tuple[np.ndarray, "ClusterSums"]]


def lloyd(points: Any, centroids: np.ndarray, n_iter: int, search_precision: str = "float32") -> np.ndarray:
    """`n_iter` rounds of (assign every point to its nearest centroid, move each centroid to the
    mean of its points) from `centroids`; returns the float64 centroids after the last move.
    `points` is an (N, D) array or a `Points` spread over ranks (then every rank returns the same).
    `search_precision`: "float32" (exact), or "bfloat16" for the plain searches above
    BOUNDS_MAX_DIM dimensions where bf16 is native (see the module docstring)."""
    points = as_points(points)
    c = np.array(centroids, dtype=np.float64)
    if len(c) == 1:
        return cluster_means(points, np.zeros(points.n_local, dtype=np.int64), c)
    if points.dim > BOUNDS_MAX_DIM:
        search = _nearest_centroid_search(points, search_precision)
        return _plain_lloyd(points, c, n_iter, search)
    x = points.local()
    assignment, upper, lower = _two_nearest(x, c)
    for iteration in range(n_iter):
        moved = cluster_means(points, assignment, c, x)
        shift = np.sqrt(((moved - c) ** 2).sum(axis=1))
        c = moved
        if iteration == n_iter - 1 or not shift.any():
            break
        upper += shift[assignment]
        lower -= _largest_other_shift(shift, assignment)
        half_gap = 0.5 * np.sqrt(nearest_centroids(c, c, 2)[1][:, 1].astype(np.float64))
        bound = np.maximum(lower, half_gap[assignment])
        unsure = np.flatnonzero(upper > bound)
        upper[unsure] = np.sqrt(squared_distances(x[unsure].astype(np.float64), c[assignment[unsure], None])[:, 0])
        unsure = unsure[upper[unsure] > bound[unsure]]
        if len(unsure):
            assignment[unsure], upper[unsure], lower[unsure] = _two_nearest(x[unsure], c)
        n_unsure = int(points.comm.sum(np.array([len(unsure)]))[0])
        if n_unsure > BOUNDED_SEARCH_LIMIT * points.n:  # bounds that hold this seldom cost more than they save
            return _plain_lloyd(points, c, n_iter - iteration - 1, _nearest_centroid_search(points, "float32"))
    return c


def _plain_lloyd(points: Points, c: np.ndarray, n_iter: int, search: Search) -> np.ndarray:
    """`n_iter` rounds of Lloyd from `c`; `search(centroids)` assigns this rank's points and sums
    them per cluster in the same pass."""
    _, sums = search(c)
    for iteration in range(n_iter):
        moved = sums.means(c)
        settled = np.array_equal(moved, c)
        c = moved
        if iteration == n_iter - 1 or settled:
            break
        _, sums = search(c)
    return c


def cluster_means(points: Any, assignment: np.ndarray, fallback: np.ndarray, local: np.ndarray | None = None
                  ) -> np.ndarray:
    """Mean of each cluster's points over all ranks, from this rank's `assignment` of its points
    (`local`: those points, when already read); empty clusters keep `fallback`."""
    points = as_points(points)
    sums = ClusterSums(points, len(fallback))
    if local is not None:
        sums.add(local, assignment)
    else:
        for where, rows in points.read_blocks():
            sums.add(rows, assignment[where])
    return sums.means(fallback)


def _two_nearest(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest centroid of each row, the distance to it and to the second nearest (float64)."""
    ids, squared = nearest_centroids(x, c, 2)
    distances = np.sqrt(squared.astype(np.float64))
    return ids[:, 0], distances[:, 0], distances[:, 1]


def _largest_other_shift(shift: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """Per point, the largest move of a centroid other than its own."""
    second, first = np.argsort(shift)[-2:]
    return np.where(assignment == first, shift[second], shift[first])


def _nearest_centroid_search(points: Points, precision: str) -> Search:
    """`search(centroids)`: the nearest centroid of each of this rank's points, and their cluster sums."""
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"search precision {precision!r} is unknown; choose float32 or bfloat16")
    if precision == "bfloat16" and not gpu_available() and autocast_dtype(torch.device("cpu")) == torch.bfloat16:
        return _Bf16NearestCentroid(points).assign_and_sum

    def exact(centroids: np.ndarray) -> tuple[np.ndarray, ClusterSums]:
        assignment = np.empty(points.n_local, dtype=np.int64)
        sums = ClusterSums(points, len(centroids))
        for where, rows in points.read_blocks():
            assignment[where] = nearest_centroid(rows, centroids)[0]
            sums.add(rows, assignment[where])
        return assignment, sums

    return exact


class _Bf16NearestCentroid:
    """argmin_j |x - c_j|^2 = argmax_j (x . c_j - |c_j|^2 / 2 - r(x)) for any per-point r, as one
    bf16 GEMM of [x, 1, 1, r] with [c, -b_hi, -b_lo, -1] (b_hi + b_lo: |c_j|^2 / 2 split into two
    bf16 numbers). The GEMM accumulates in float32 but rounds its result to bf16, relative to the
    result's size; with r the point's score against its centroid of the previous search, the
    results that compete for the maximum are close to 0 and keep their precision; only the dot
    products' inputs are rounded then. The first search has r = |x|^2 / 2: its results are
    -|x - c_j|^2 / 2, rounded relative to the squared distances. GEMMs run per block of rows (and
    chunks of BF16_SEARCH_CHUNK_ROWS inside it), the same on any world size."""

    def __init__(self, points: Any):
        self.points = as_points(points)
        self.reference: torch.Tensor | None = None

    def __call__(self, centroids: np.ndarray) -> np.ndarray:
        return self.assign_and_sum(centroids)[0]

    def assign_and_sum(self, centroids: np.ndarray) -> tuple[np.ndarray, ClusterSums]:
        c = torch.from_numpy(np.asarray(centroids, dtype=np.float64))
        half_sq_norm = (c * c).sum(dim=1) / 2
        high = half_sq_norm.bfloat16()
        low = (half_sq_norm - high.double()).bfloat16()
        minus_one = torch.full((len(c), 1), -1, dtype=torch.bfloat16)
        weights = torch.cat([c.bfloat16(), -high[:, None], -low[:, None], minus_one], dim=1).T.contiguous()
        first_search = self.reference is None
        if first_search:
            self.reference = torch.empty(self.points.n_local)
        nearest = torch.empty(self.points.n_local, dtype=torch.int64)
        sums = ClusterSums(self.points, len(c))
        d = self.points.dim
        for where, rows in self.points.read_blocks():
            x = torch.from_numpy(rows)
            if first_search:
                self.reference[where] = x.square().sum(dim=1) / 2
            augmented = torch.empty(len(x), d + 3, dtype=torch.bfloat16)
            augmented[:, :d] = x
            augmented[:, d:d + 2] = 1
            augmented[:, -1] = self.reference[where]
            reference = augmented[:, -1].float()  # the r the GEMM sees
            for start in range(0, len(x), BF16_SEARCH_CHUNK_ROWS):
                chunk = slice(start, start + BF16_SEARCH_CHUNK_ROWS)
                best = torch.mm(augmented[chunk], weights).max(dim=1)
                nearest[where][chunk] = best.indices
                self.reference[where][chunk] = best.values.float() + reference[chunk]
            sums.add(rows, nearest[where].numpy())
        return nearest.numpy(), sums
