"""Seeding k-means with greedy k-means++, the seeding of Vo et al.

Seeding is what makes hierarchical k-means with resampling balance the modes of the data: D²
sampling puts seeds in sparse regions, and each resampling step re-seeds on points that already
cover the modes more evenly (with random seeds the five-ring toy of Vo et al. stays as
unbalanced as uniform sampling). Greedy k-means++ makes one pass over its points per seed, so a
fit on many points per cluster seeds on a random subset of `max_points_per_cluster` * k of them.
With that at least the resampling sample size, the resampling fits, which do the balancing, seed
on all their points as in Vo et al.; a level's first fit on all points, which is only where
resampling starts from, seeds on the subset.
"""

from __future__ import annotations

import numpy as np
import torch

from dinoscale.utils.device import default_device


def seed_rows(points: np.ndarray, k: int, rng: np.random.Generator, max_points_per_cluster: int) -> np.ndarray:
    """Rows of `points` to start k-means from: greedy k-means++ over all of them, or over a random
    subset of `max_points_per_cluster` * k rows when there are more."""
    n = points.shape[0]
    population = max_points_per_cluster * k
    if n <= population:
        return greedy_kmeans_plus_plus(points, k, rng)
    subset = np.sort(rng.choice(n, size=population, replace=False))
    return subset[greedy_kmeans_plus_plus(points[subset], k, rng)]


def greedy_kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices of k seeds: the first uniformly at random, each next one, of 2 + ln(k)
    candidates drawn in proportion to the squared distance to the nearest seed so far, the one
    that lowers the sum of those squared distances most (scikit-learn's greedy k-means++)."""
    x = torch.from_numpy(np.asarray(points, dtype=np.float32)).to(default_device())
    x = x - x.mean(dim=0)  # distances are unchanged; the expansion below loses less to rounding
    n = x.shape[0]
    n_candidates = 2 + int(np.log(k))
    sq_norms = (x * x).sum(dim=1)

    def squared_distances(rows: torch.Tensor) -> torch.Tensor:  # (n, len(rows))
        return torch.addmm(sq_norms[:, None], x, x[rows].T, alpha=-2).add_(sq_norms[rows]).clamp_(min=0)

    chosen = [int(rng.integers(n))]
    closest = squared_distances(torch.tensor(chosen, device=x.device))[:, 0]
    for _ in range(1, k):
        cumulative = torch.cumsum(closest, 0, dtype=torch.float64)
        draws = torch.from_numpy(rng.random(n_candidates)).to(x.device) * cumulative[-1]
        candidates = torch.searchsorted(cumulative, draws).clamp_(max=n - 1)
        distances = torch.minimum(squared_distances(candidates), closest[:, None])
        best = int(torch.argmin(distances.sum(dim=0, dtype=torch.float64)))
        closest = distances[:, best].contiguous()
        chosen.append(int(candidates[best]))
    return np.array(chosen, dtype=np.int64)
