"""Retrieval curation: k nearest pool images of seed images (vs brute force), cluster mode."""

from __future__ import annotations

import numpy as np
import pytest

from dinoscale.curation.config import RetrievalConfig
from dinoscale.curation.retrieval import retrieval_curation, retrieve_by_clusters, retrieve_nearest
from dinoscale.errors import ConfigError, DataError


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def brute_force_retrieval(pool: np.ndarray, seed_sets: list[np.ndarray], k: int, candidates: np.ndarray):
    """pool index -> (seed set, seed index, cosine) of the most similar seed that has it in its top k."""
    best: dict[int, tuple[int, int, float]] = {}
    pool_n = unit(pool[candidates])
    for s, seeds in enumerate(seed_sets):
        sim = unit(seeds) @ pool_n.T
        for q in range(len(seeds)):
            for j in np.argsort(-sim[q])[:k]:
                i = int(candidates[j])
                if i not in best or sim[q, j] > best[i][2]:
                    best[i] = (s, q, float(sim[q, j]))
    return best


@pytest.mark.parametrize("with_candidates", [False, True])
def test_k_nearest_match_brute_force(with_candidates: bool):
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((700, 32)).astype(np.float32) * rng.uniform(0.5, 2.0, (700, 1)).astype(np.float32)
    seed_sets = [rng.standard_normal((15, 32)).astype(np.float32), rng.standard_normal((8, 32)).astype(np.float32)]
    candidates = np.sort(rng.choice(700, 400, replace=False)) if with_candidates else np.arange(700)
    result = retrieve_nearest(pool, seed_sets, k=4, candidates=candidates if with_candidates else None)
    expected = brute_force_retrieval(pool, seed_sets, 4, candidates)
    assert result.indices.tolist() == sorted(expected)
    for i, s, q, sim in zip(result.indices, result.seed_set, result.seed_index, result.similarity):
        assert (s, q) == expected[int(i)][:2]
        assert sim == pytest.approx(expected[int(i)][2], abs=1e-5)
    assert (result.cluster == -1).all()


def test_cluster_mode_takes_clusters_with_enough_seeds():
    rng = np.random.default_rng(1)
    centroids = np.eye(5, 16, dtype=np.float32) * 10
    sizes = [6, 10, 4, 3, 7]
    pool_assignment = rng.permutation(np.repeat(np.arange(5), sizes))
    near = lambda c, n: centroids[c] + rng.standard_normal((n, 16)).astype(np.float32) * 0.1  # noqa: E731
    seed_sets = [np.concatenate([near(1, 4), near(3, 5), near(2, 3)]),  # clusters 1 and 3 pass min 3
                 np.concatenate([near(4, 2), near(0, 4)])]  # cluster 0 passes
    result = retrieve_by_clusters(seed_sets, centroids, pool_assignment, min_seeds_per_cluster=3,
                                  images_per_cluster=5, seed=0)
    taken = np.bincount(pool_assignment[result.indices], minlength=5)
    assert taken.tolist() == [5, 5, 0, 3, 0]
    assert result.indices.tolist() == sorted(set(result.indices.tolist()))
    np.testing.assert_array_equal(result.cluster, pool_assignment[result.indices])
    np.testing.assert_array_equal(result.seed_set, np.where(result.cluster == 0, 1, 0))
    again = retrieve_by_clusters(seed_sets, centroids, pool_assignment, 3, 5, seed=0)
    np.testing.assert_array_equal(again.indices, result.indices)


def test_retrieval_curation_dispatches_and_checks():
    rng = np.random.default_rng(2)
    pool = rng.standard_normal((100, 8)).astype(np.float32)
    seeds = [rng.standard_normal((3, 8)).astype(np.float32)]
    result = retrieval_curation(pool, seeds, RetrievalConfig(k=2))
    assert len(result.indices) <= 6
    centroids = pool[:4]
    assignment = rng.integers(0, 4, 100)
    clustered = retrieval_curation(pool, seeds, RetrievalConfig(cluster_based=True, min_seeds_per_cluster=0,
                                                                images_per_cluster=3),
                                   candidates=np.arange(50), centroids=centroids, pool_assignment=assignment)
    assert (clustered.indices < 50).all()
    with pytest.raises(ConfigError, match="kmeans stage"):
        retrieval_curation(pool, seeds, RetrievalConfig(cluster_based=True))
    with pytest.raises(ConfigError, match="seed_sets is empty"):
        retrieval_curation(pool, [], RetrievalConfig())
    with pytest.raises(DataError, match="backbone"):
        retrieval_curation(pool, [np.ones((2, 4), np.float32)], RetrievalConfig())
