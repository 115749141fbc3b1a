"""Balanced hierarchical sampling: the cut rule, quotas down the tree, repeats, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from dinoscale.curation.config import SamplingConfig
from dinoscale.curation.kmeans import ClusterLevel, ClusterTree
from dinoscale.curation.sampling import hierarchical_sample, split_quota
from dinoscale.errors import ConfigError


def brute_force_cut(sizes: np.ndarray, target: int) -> int:
    """The largest c with sum(min(c, size)) <= target, by trying every c."""
    best = 0
    for c in range(int(sizes.max()) + 1):
        if np.minimum(c, sizes).sum() <= target:
            best = c
    return best


def check_quota(sizes: np.ndarray, target: int, quota: np.ndarray) -> None:
    """Each child gets min(cut, size), some children above the cut one more, summing to target."""
    if sizes.sum() <= target:
        np.testing.assert_array_equal(quota, sizes)
        return
    cut = brute_force_cut(sizes, target)
    base = np.minimum(cut, sizes)
    extra = quota - base
    assert set(np.unique(extra)) <= {0, 1}
    assert np.all(sizes[extra == 1] > cut)
    assert quota.sum() == target
    assert np.all(quota <= sizes)


@pytest.mark.parametrize("seed", range(5))
def test_split_quota_follows_the_cut_rule(seed: int):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 60, 25) * rng.integers(0, 2, 25) + rng.integers(0, 3, 25)
    for target in (0, 1, 17, int(sizes.sum()) // 2, int(sizes.sum()) - 1, int(sizes.sum()), int(sizes.sum()) + 9):
        quota = split_quota(sizes, np.zeros(len(sizes), dtype=np.int64), np.array([target]), rng)
        check_quota(sizes, min(target, int(sizes.sum())), quota)


def test_split_quota_solves_all_groups_at_once():
    rng = np.random.default_rng(10)
    group = rng.integers(0, 6, 80)
    sizes = rng.integers(1, 40, 80)
    capacity = np.bincount(group, weights=sizes, minlength=6).astype(np.int64)
    targets = (capacity * rng.random(6)).astype(np.int64)
    quota = split_quota(sizes, group, targets, rng)
    for g in range(6):
        check_quota(sizes[group == g], int(targets[g]), quota[group == g])


def three_level_tree(seed: int = 0) -> tuple[ClusterTree, np.ndarray]:
    """A random tree: 1000 points in 60 leaves, 12 middle clusters, 4 top clusters (uneven sizes)."""
    rng = np.random.default_rng(seed)
    leaf_of_point = np.minimum((rng.pareto(1.2, 1000) * 6).astype(np.int64), 59)
    leaf_of_point[:60] = np.arange(60)  # every leaf non-empty
    middle_of_leaf = np.r_[np.arange(12), rng.integers(0, 12, 48)]
    top_of_middle = np.r_[np.arange(4), rng.integers(0, 4, 8)]
    distances = rng.random(1000).astype(np.float32)
    levels = [
        ClusterLevel(np.zeros((60, 2), np.float32), leaf_of_point, distances),
        ClusterLevel(np.zeros((12, 2), np.float32), middle_of_leaf, np.zeros(60, np.float32)),
        ClusterLevel(np.zeros((4, 2), np.float32), top_of_middle, np.zeros(12, np.float32)),
    ]
    return ClusterTree(levels), distances


@pytest.mark.parametrize("target", [1, 100, 377, 999, 1000])
def test_quotas_follow_the_cut_rule_at_every_level(target: int):
    tree, _ = three_level_tree()
    result = hierarchical_sample(tree, SamplingConfig(target_size=target), seed=1)
    assert len(result.indices) == target
    assert len(np.unique(result.indices)) == target
    leaf = tree.levels[0].assignment
    middle = tree.levels[1].assignment[leaf]
    top = tree.levels[2].assignment[middle]
    np.testing.assert_array_equal(result.cluster_path, np.stack([leaf, middle, top], 1)[result.indices])

    # top level: the target over the top clusters
    top_sizes = np.bincount(top, minlength=4)
    top_quota = np.bincount(top[result.indices], minlength=4)
    check_quota(top_sizes, target, top_quota)
    # each top cluster's quota over its middle clusters, each middle cluster's over its leaves
    middle_sizes = np.bincount(middle, minlength=12)
    middle_quota = np.bincount(middle[result.indices], minlength=12)
    for t in range(4):
        children = tree.levels[2].assignment == t
        check_quota(middle_sizes[children], int(top_quota[t]), middle_quota[children])
    leaf_sizes = np.bincount(leaf, minlength=60)
    leaf_quota = np.bincount(leaf[result.indices], minlength=60)
    for m in range(12):
        children = tree.levels[1].assignment == m
        check_quota(leaf_sizes[children], int(middle_quota[m]), leaf_quota[children])


def test_closest_strategy_takes_points_nearest_their_centroid():
    tree, distances = three_level_tree(seed=2)
    result = hierarchical_sample(tree, SamplingConfig(target_size=300, strategy="closest"), seed=0)
    leaf = tree.levels[0].assignment
    for c in np.unique(leaf):
        members = np.flatnonzero(leaf == c)
        chosen = np.intersect1d(result.indices, members)
        expected = members[np.argsort(distances[members])[:len(chosen)]]
        assert set(chosen) == set(expected)


def test_deterministic_in_the_seed():
    tree, _ = three_level_tree(seed=3)
    cfg = SamplingConfig(target_size=250)
    a = hierarchical_sample(tree, cfg, seed=5)
    b = hierarchical_sample(tree, cfg, seed=5)
    c = hierarchical_sample(tree, cfg, seed=6)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)


def small_tree(leaf_sizes: list[int]) -> ClusterTree:
    """Two levels: the given leaves all under one top cluster."""
    leaf = np.repeat(np.arange(len(leaf_sizes)), leaf_sizes)
    return ClusterTree([
        ClusterLevel(np.zeros((len(leaf_sizes), 2), np.float32), leaf, np.arange(len(leaf), dtype=np.float32)),
        ClusterLevel(np.zeros((1, 2), np.float32), np.zeros(len(leaf_sizes), dtype=np.int64),
                     np.zeros(len(leaf_sizes), np.float32)),
    ])


def test_allow_repeats_fills_a_target_larger_than_the_pool():
    tree = small_tree([1, 9])  # 10 points, target 25: each point may appear ceil(25/10) = 3 times
    result = hierarchical_sample(tree, SamplingConfig(target_size=25, allow_repeats=True), seed=0)
    assert len(result.indices) == 25
    copies = np.bincount(result.indices, minlength=10)
    # capacities 3 and 27; the cut 22 gives the lone point 3 copies and the other leaf 22 = 9*2 + 4
    assert copies[0] == 3
    assert sorted(copies[1:].tolist()) == [2] * 5 + [3] * 4

    without = hierarchical_sample(tree, SamplingConfig(target_size=25, allow_repeats=False), seed=0)
    np.testing.assert_array_equal(without.indices, np.arange(10))


def test_unknown_strategy_is_a_config_error():
    with pytest.raises(ConfigError, match="strategy"):
        hierarchical_sample(small_tree([3]), SamplingConfig(target_size=2, strategy="nearest"))
