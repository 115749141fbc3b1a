"""Balanced hierarchical sampling from a cluster tree (Vo et al. 2024).

Top-down: the target size is spread over the top-level clusters, then each cluster's quota over
its children, and so on down to the first-level clusters, which give points. At every split a
child of size s gets min(cut, s), where `cut` is the largest integer with
sum(min(cut, s_i)) <= quota, and the few points still missing go, one each, to children chosen
at random among those bigger than the cut. Small clusters are thus kept whole and big ones are
cut down to the same size, at every level. Leaves give random points or the points closest to
their centroid. Every split of one level is solved at once, vectorised over all clusters.

Under a process group each rank handles its own blocks of points (`collective`): the cluster
sizes are summed over ranks, every rank solves the same splits with the same random draws, and
the leaves' picks are found by a distributed selection; random keys are drawn per block. The
sample is the same on any world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dinoscale.curation.collective import Comm, block_uniforms, rank_within_groups, smallest_in_groups
from dinoscale.curation.config import SamplingConfig
from dinoscale.curation.kmeans import ClusterTree
from dinoscale.errors import ConfigError
from dinoscale.utils.logging import get_logger

log = get_logger(__name__)


@dataclass
class SampleResult:
    """Selected point indices (sorted; an index repeats only with allow_repeats) and their clusters."""

    indices: np.ndarray  # (n_selected,) int64
    cluster_path: np.ndarray  # (n_selected, n_levels) int64, the cluster at each level, finest first


def hierarchical_sample(tree: ClusterTree, cfg: SamplingConfig, seed: int = 0) -> SampleResult:
    """Pick `cfg.target_size` points of the tree's pool (a `SamplingConfig`), deterministic in `seed`;
    on every rank of the process group, which each read only their own points of the tree."""
    if cfg.strategy not in ("random", "closest"):
        raise ConfigError(f"curation.sampling.strategy = {cfg.strategy!r}; choose 'random' or 'closest'")
    comm = Comm.current()
    rng = np.random.default_rng(seed)
    n_points, n_levels = tree.n_points, len(tree.levels)
    rows = comm.rows(n_points)
    paths = tree.point_clusters(rows)
    target = cfg.target_size
    copies_per_point = 1
    if target > n_points:
        if cfg.allow_repeats:
            copies_per_point = math.ceil(target / n_points)
        else:
            log.warning("sampling: target_size %d exceeds the %d points of the pool; taking them all "
                        "(set curation.sampling.allow_repeats=true to repeat images up to the target)",
                        target, n_points)
            target = n_points

    def sizes(level: int) -> np.ndarray:
        return comm.sum(np.bincount(paths[:, level], minlength=tree.levels[level].n_clusters))

    top = n_levels - 1
    quota = split_quota(sizes(top) * copies_per_point, np.zeros(tree.levels[top].n_clusters, dtype=np.int64),
                        np.array([target]), rng)
    for level in range(top - 1, -1, -1):
        quota = split_quota(sizes(level) * copies_per_point, tree.levels[level + 1].assignment, quota, rng)

    leaf, leaf_size = paths[:, 0], sizes(0)
    if cfg.strategy == "closest":
        rank_key = np.asarray(tree.levels[0].distances[rows.start:rows.stop])
    else:
        rank_key = block_uniforms(rows, int(rng.integers(2 ** 63)))
    # a leaf of s points with quota q gives every point q // s copies, and one more to the q % s ranked first
    extra = smallest_in_groups(leaf, rank_key, quota % np.maximum(leaf_size, 1), rows.start, comm)
    copies = quota[leaf] // np.maximum(leaf_size[leaf], 1) + extra
    local = np.repeat(np.arange(rows.start, rows.stop), copies)
    return SampleResult(comm.concat(local), comm.concat(paths[local - rows.start]))


def largest_cut(capacity: np.ndarray, group: np.ndarray, group_target: np.ndarray) -> np.ndarray:
    """Per group g: the largest integer c with sum over its members of min(c, capacity) <= target[g].

    Where a group's whole capacity fits its target, c is the group's largest capacity.
    Binary search run for all groups at once.
    """
    n_groups = len(group_target)

    def filled(cut: np.ndarray) -> np.ndarray:
        return np.bincount(group, weights=np.minimum(cut[group], capacity), minlength=n_groups)

    high = np.zeros(n_groups, dtype=np.int64)
    np.maximum.at(high, group, capacity)
    low = np.zeros(n_groups, dtype=np.int64)
    searching = filled(high) > group_target  # invariant while searching: filled(low) <= target < filled(high)
    low[~searching] = high[~searching]
    while np.any(searching & (high - low > 1)):
        mid = (low + high) // 2
        fits = filled(mid) <= group_target
        low = np.where(searching & fits, mid, low)
        high = np.where(searching & ~fits, mid, high)
    return low


def split_quota(capacity: np.ndarray, group: np.ndarray, group_target: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """Spread each group's target over its members: min(cut, capacity), plus one for as many
    randomly chosen members above the cut as needed to reach the target exactly."""
    cut = largest_cut(capacity, group, group_target)
    quota = np.minimum(cut[group], capacity)
    missing = group_target - np.bincount(group, weights=quota, minlength=len(group_target)).astype(np.int64)
    above = np.flatnonzero(capacity > cut[group])
    order = above[np.lexsort((rng.random(len(above)), group[above]))]
    rank = rank_within_groups(group[order])
    quota[order[rank < missing[group[order]]]] += 1
    return quota
