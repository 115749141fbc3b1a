"""Seeding k-means with greedy k-means++, the seeding of Vo et al.

Seeding is what makes hierarchical k-means with resampling balance the modes of the data: D²
sampling puts seeds in sparse regions, and each resampling step re-seeds on points that already
cover the modes more evenly (with random seeds the five-ring toy of Vo et al. stays as
unbalanced as uniform sampling). Greedy k-means++ makes one pass over its points per seed, so a
fit on many points per cluster seeds on a random subset of `max_points_per_cluster` * k of them.
With that at least the resampling sample size, the resampling fits, which do the balancing, seed
on all their points as in Vo et al.; a level's first fit on all points, which is only where
resampling starts from, seeds on the subset.

Each step needs, for every point, the smaller of its squared distance to the nearest seed so far
and to each candidate. In many dimensions that is a skinny float32 GEMM over all points per
step, which dominates the seeding. Where bf16 matmuls are native, a bf16 GEMM first screens out
the points that no candidate can be closer to: its rounding error is bounded (below), so a point
whose screened distance exceeds its current one by more than the bound keeps its current
distance exactly. Only the remaining points (a few percent after the first seeds) get exact
float32 distances, so the seeds are those of the unscreened computation.
"""

from __future__ import annotations

import numpy as np
import torch

from dinoscale.utils.device import autocast_dtype, default_device, torch_threads

BF16_UNIT_ROUNDOFF = 2.0 ** -8
FP32_UNIT_ROUNDOFF = 2.0 ** -24
SCREEN_MIN_DIM = 32  # below it the float32 GEMM costs less than the screening around it
# Below this many points a step is some 40 small tensor operations, where waking a second CPU
# thread for each costs more than it saves (with OMP_WAIT_POLICY=passive).
SINGLE_THREAD_MAX_ROWS = 32768
ALL_ROWS = slice(None)


def seed_rows(points: np.ndarray, k: int, rng: np.random.Generator, max_points_per_cluster: int) -> np.ndarray:
    """Rows of `points` to start k-means from: greedy k-means++ over all of them, or over a random
    subset of `max_points_per_cluster` * k rows when there are more."""
    n = points.shape[0]
    population = max_points_per_cluster * k
    if n <= population:
        return greedy_kmeans_plus_plus(points, k, rng)
    subset = np.sort(rng.choice(n, size=population, replace=False))
    return subset[greedy_kmeans_plus_plus(points[subset], k, rng)]


def greedy_kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator,
                            screen: bool | None = None) -> np.ndarray:
    """Row indices of k seeds: the first uniformly at random, each next one, of 2 + ln(k)
    candidates drawn in proportion to the squared distance to the nearest seed so far, the one
    that lowers the sum of those squared distances most (scikit-learn's greedy k-means++).

    `screen` (default: where bf16 matmuls are native and there are SCREEN_MIN_DIM dimensions or
    more) skips the exact distances of points no candidate can come closer to; the seeds are the
    same either way."""
    x = torch.from_numpy(np.asarray(points, dtype=np.float32)).to(default_device())
    x = x - x.mean(dim=0)  # distances are unchanged; the expansion below loses less to rounding
    n = x.shape[0]
    if screen is None:
        screen = x.shape[1] >= SCREEN_MIN_DIM and autocast_dtype(x.device) == torch.bfloat16
    distances = _ScreenedDistances(x) if screen else _ExactDistances(x)
    n_candidates = 2 + int(np.log(k))

    chosen = [int(rng.integers(n))]
    with torch_threads(1 if n <= SINGLE_THREAD_MAX_ROWS else torch.get_num_threads()):
        closest = distances.exact(ALL_ROWS, torch.tensor(chosen, device=x.device))[:, 0].contiguous()
        for _ in range(1, k):
            cumulative = torch.cumsum(closest, 0, dtype=torch.float64)
            draws = torch.from_numpy(rng.random(n_candidates)).to(x.device) * cumulative[-1]
            candidates = torch.searchsorted(cumulative, draws).clamp_(max=n - 1)
            rows = distances.rows_a_candidate_may_improve(candidates, closest)
            current = closest[rows, None]
            updated = torch.minimum(distances.exact(rows, candidates), current)
            best = int(torch.argmax((current - updated).sum(dim=0, dtype=torch.float64)))
            closest[rows] = updated[:, best]
            chosen.append(int(candidates[best]))
    return np.array(chosen, dtype=np.int64)


class _ExactDistances:
    """float32 squared distances between rows of centred points, by the expansion |x|² + |c|² - 2x·c."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.sq_norms = (x * x).sum(dim=1)

    def exact(self, rows: torch.Tensor | slice, columns: torch.Tensor) -> torch.Tensor:  # (len(rows), len(columns))
        sq = self.sq_norms
        return torch.addmm(sq[rows, None], self.x[rows], self.x[columns].T, alpha=-2).add_(sq[columns]).clamp_(min=0)

    def rows_a_candidate_may_improve(self, candidates: torch.Tensor, closest: torch.Tensor) -> torch.Tensor | slice:
        return ALL_ROWS


class _ScreenedDistances(_ExactDistances):
    """Exact distances plus a bf16 screen for the rows where a candidate may be closer.

    With u the bf16 unit roundoff, rounding x and c to bf16 moves each product x_i c_i by at most
    (2u + u²)|x_i c_i|, the float32 accumulation of d products by d u32 Σ|x_i c_i| (u32 the
    float32 unit roundoff, to first order), and rounding the bf16 result by u|x·c|; by
    Cauchy-Schwarz Σ|x_i c_i| <= |x||c|, so the screened dot product is within
    (3u + 2u² + 2d u32) |x||c| of the true one. The exact float32 distance is in turn within
    (d + 4) u32 (|x|² + |c|²) of the true squared distance. A point whose screened squared
    distance to c, lowered by both, still reaches its current squared distance keeps the current
    one exactly, and needs no exact distance.
    """

    def __init__(self, x: torch.Tensor):
        super().__init__(x)
        d = x.shape[1]
        self.x_bf16 = x.bfloat16()
        self.norms = self.sq_norms.sqrt()
        u = BF16_UNIT_ROUNDOFF
        self.dot_error = 2 * (3 * u + 2 * u * u + 2 * d * FP32_UNIT_ROUNDOFF)  # per |x||c|, on -2x·c
        self.keep_fraction = 1 - (d + 4) * FP32_UNIT_ROUNDOFF  # of |x|² + |c|²

    def rows_a_candidate_may_improve(self, candidates: torch.Tensor, closest: torch.Tensor) -> torch.Tensor:
        dots = self.x_bf16[candidates].matmul(self.x_bf16.T).float()  # (candidates, n)
        # screened |x|² + |c|² - 2x·c minus both error bounds < closest, rearranged as lhs > rhs
        lhs = torch.addr(dots, self.norms[candidates], self.norms, beta=2, alpha=self.dot_error)
        lhs.sub_(self.keep_fraction * self.sq_norms[candidates, None])
        rhs = self.keep_fraction * self.sq_norms - closest
        return torch.nonzero(lhs.amax(dim=0) > rhs).squeeze(1)  # amax: no (n, k) bool matrix, unlike .any(0)
