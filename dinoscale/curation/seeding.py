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

The points may be spread over ranks (`points.Points`, in fixed blocks). Each step then draws its
candidates from per-block cumulative sums of the squared distances (the blocks' totals gathered
in block order, so every rank finds the same block and the rank that owns it the point), and
picks the best one from per-block sums of each candidate's improvement, added up in block order
on every rank: the seeds do not depend on the world size. Per block, the GEMMs have the same
shapes on any world size.
"""

from __future__ import annotations

import numpy as np
import torch

from dinoscale.curation.points import Points, as_points
from dinoscale.utils.device import autocast_dtype, default_device, torch_threads

BF16_UNIT_ROUNDOFF = 2.0 ** -8
FP32_UNIT_ROUNDOFF = 2.0 ** -24
SCREEN_MIN_DIM = 32  # below it the float32 GEMM costs less than the screening around it
# Below this many points a step is some 40 small tensor operations, where waking a second CPU
# thread for each costs more than it saves (with OMP_WAIT_POLICY=passive).
SINGLE_THREAD_MAX_ROWS = 32768


def seed_rows(points: Points | np.ndarray, k: int, rng: np.random.Generator, max_points_per_cluster: int
              ) -> np.ndarray:
    """Rows of `points` to start k-means from: greedy k-means++ over all of them, or over a random
    subset of `max_points_per_cluster` * k rows when there are more."""
    points = as_points(points)
    population = max_points_per_cluster * k
    if points.n <= population:
        return greedy_kmeans_plus_plus(points, k, rng)
    subset = np.sort(rng.choice(points.n, size=population, replace=False))
    return subset[greedy_kmeans_plus_plus(points.take(subset), k, rng)]


def greedy_kmeans_plus_plus(points: Points | np.ndarray, k: int, rng: np.random.Generator,
                            screen: bool | None = None) -> np.ndarray:
    """Row indices of k seeds: the first uniformly at random, each next one, of 2 + ln(k)
    candidates drawn in proportion to the squared distance to the nearest seed so far, the one
    that lowers the sum of those squared distances most (scikit-learn's greedy k-means++).

    `screen` (default: where bf16 matmuls are native and there are SCREEN_MIN_DIM dimensions or
    more) skips the exact distances of points no candidate can come closer to; the seeds are the
    same either way. Points that one rank holds alone are seeded by that rank alone (the others
    wait for the seeds): the same computation, without an exchange per step."""
    points = as_points(points)
    if points.sole_holder() is not None:
        return points.on_sole_holder(lambda alone: greedy_kmeans_plus_plus(alone, k, rng, screen), rng)
    device = default_device()
    # centred (distances are unchanged; the expansion below loses less to rounding) on the same mean everywhere
    x = torch.from_numpy(points.local() - points.mean().astype(np.float32)).to(device)
    if screen is None:
        screen = points.dim >= SCREEN_MIN_DIM and autocast_dtype(device) == torch.bfloat16
    distances = _ScreenedDistances(x) if screen else _ExactDistances(x)
    blocks = [slice(b.start - points.rows.start, b.stop - points.rows.start) for b in points.blocks()]
    blocks_per_rank = points.blocks_per_rank()
    first_block = sum(blocks_per_rank[:points.comm.rank])
    n_candidates = 2 + int(np.log(k))

    chosen = [int(rng.integers(points.n))]
    threads = 1 if points.n_local <= SINGLE_THREAD_MAX_ROWS else torch.get_num_threads()
    with torch_threads(threads):
        seed = _rows_at(points, x, chosen)
        closest = torch.empty(points.n_local, device=device)
        for block in blocks:
            closest[block] = distances.exact(block, seed, (seed * seed).sum(dim=1))[:, 0]
        # each block's sum of `closest`, on every rank (afterwards, each step's gather brings the new ones)
        totals = points.comm.concat(_block_sums(closest, blocks), blocks_per_rank)
        for _ in range(1, k):
            block_ends = np.cumsum(totals)
            draws = rng.random(n_candidates) * block_ends[-1]
            in_block = np.minimum(np.searchsorted(block_ends, draws), len(block_ends) - 1)
            before = np.where(in_block > 0, block_ends[np.maximum(in_block - 1, 0)], 0.0)
            candidates = np.full(n_candidates, -1, dtype=np.int64)
            for b in np.unique(in_block[(in_block >= first_block) & (in_block < first_block + len(blocks))]):
                hits = np.flatnonzero(in_block == b)
                cumulative = torch.cumsum(closest[blocks[b - first_block]], 0, dtype=torch.float64)
                targets = torch.from_numpy(draws[hits] - before[hits]).to(device)
                within = torch.searchsorted(cumulative, targets).clamp_(max=len(cumulative) - 1).cpu().numpy()
                candidates[hits] = points.rows.start + blocks[b - first_block].start + within
            candidates, vectors = _candidates_everywhere(points, x, candidates)
            sq_vectors = (vectors * vectors).sum(dim=1)
            new_totals, updates = [], []
            for block in blocks:
                rows = distances.rows_a_candidate_may_improve(block, vectors, sq_vectors, closest)
                current = closest[rows, None]
                updated = torch.minimum(distances.exact(rows, vectors, sq_vectors), current)
                # the block's sum of `closest` if candidate j is chosen, for every j
                unchanged = closest[block].sum(dtype=torch.float64) - current.sum(dtype=torch.float64)
                new_totals.append(unchanged + updated.sum(dim=0, dtype=torch.float64))
                updates.append((rows, updated))
            local = torch.stack(new_totals).cpu().numpy() if blocks else np.zeros((0, n_candidates))
            new_totals = points.comm.concat(local, blocks_per_rank)
            best = int(np.argmin(new_totals.sum(axis=0)))  # the candidate that lowers the sum most
            for rows, updated in updates:
                closest[rows] = updated[:, best]
            totals = new_totals[:, best]
            chosen.append(int(candidates[best]))
    return np.array(chosen, dtype=np.int64)


def _block_sums(values: torch.Tensor, blocks: list[slice]) -> np.ndarray:
    """Each block's sum of `values` in float64."""
    return np.array([float(values[block].sum(dtype=torch.float64)) for block in blocks])


def _candidates_everywhere(points: Points, x: torch.Tensor, candidates: np.ndarray
                           ) -> tuple[np.ndarray, torch.Tensor]:
    """The candidates' global rows and centred vectors on every rank, from the ranks that drew them
    (-1 elsewhere): one all-reduce, exact since each entry has one contributor."""
    if points.comm.world == 1:
        return candidates, x[torch.from_numpy(candidates - points.rows.start).to(x.device)]
    mine = np.flatnonzero(candidates >= 0)
    packed = np.zeros((len(candidates), 1 + x.shape[1]))
    packed[mine, 0] = candidates[mine] + 1
    packed[mine, 1:] = x[torch.from_numpy(candidates[mine] - points.rows.start).to(x.device)].double().cpu().numpy()
    packed = points.comm.sum(packed)
    return packed[:, 0].astype(np.int64) - 1, torch.from_numpy(packed[:, 1:].astype(np.float32)).to(x.device)


def _rows_at(points: Points, x: torch.Tensor, positions) -> torch.Tensor:
    """The centred rows at global `positions`, gathered from the ranks that hold them."""
    positions = np.asarray(positions, dtype=np.int64)
    mine = np.where((positions >= points.rows.start) & (positions < points.rows.stop), positions, -1)
    return _candidates_everywhere(points, x, mine)[1]


class _ExactDistances:
    """float32 squared distances between rows of centred points and candidates, by the expansion
    |x|² + |c|² - 2x·c."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.sq_norms = (x * x).sum(dim=1)

    def exact(self, rows: torch.Tensor | slice, columns: torch.Tensor, sq_columns: torch.Tensor
              ) -> torch.Tensor:  # (len(rows), len(columns)); sq_columns: their squared norms
        return torch.addmm(self.sq_norms[rows, None], self.x[rows], columns.T, alpha=-2).add_(sq_columns).clamp_(min=0)

    def rows_a_candidate_may_improve(self, block: slice, candidates: torch.Tensor, sq_candidates: torch.Tensor,
                                     closest: torch.Tensor) -> torch.Tensor | slice:
        return block


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

    def rows_a_candidate_may_improve(self, block: slice, candidates: torch.Tensor, sq_candidates: torch.Tensor,
                                     closest: torch.Tensor) -> torch.Tensor:
        dots = candidates.bfloat16().matmul(self.x_bf16[block].T).float()  # (candidates, rows of the block)
        # screened |x|² + |c|² - 2x·c minus both error bounds < closest, rearranged as lhs > rhs
        lhs = torch.addr(dots, sq_candidates.sqrt(), self.norms[block], beta=2, alpha=self.dot_error)
        lhs.sub_(self.keep_fraction * sq_candidates[:, None])
        rhs = self.keep_fraction * self.sq_norms[block] - closest[block]
        return block.start + torch.nonzero(lhs.amax(dim=0) > rhs).squeeze(1)  # amax: no (n, k) bool matrix, unlike .any(0)
