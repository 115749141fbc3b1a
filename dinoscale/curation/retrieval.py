"""Retrieval curation (DINOv2, section 3): pool images that look like seed datasets.

Nearest-neighbour mode: every seed image brings its k nearest pool images (cosine; DINOv2 used
k=4, up to 32). Cluster mode, for small seed sets: the pool is clustered, each seed image is
put in its nearest cluster, and every cluster holding more than `min_seeds_per_cluster` seed
images of one set gives up to `images_per_cluster` random images of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dinoscale.curation.config import RetrievalConfig
from dinoscale.curation.faiss_utils import check_embeddings, inner_product_index, nearest_centroid, search
from dinoscale.curation.collective import rank_within_groups
from dinoscale.errors import ConfigError, DataError
from dinoscale.utils.logging import get_logger

log = get_logger(__name__)


@dataclass
class RetrievalResult:
    """Retrieved pool indices (unique, ascending) and, per index, where it came from."""

    indices: np.ndarray  # (M,) int64 pool indices
    seed_set: np.ndarray  # (M,) int64: which seed set retrieved it
    seed_index: np.ndarray  # (M,) int64: the seed image that retrieved it (-1 in cluster mode)
    similarity: np.ndarray  # (M,) float32: cosine to that seed image (nan in cluster mode)
    cluster: np.ndarray  # (M,) int64: the cluster it was taken from (-1 in nearest-neighbour mode)


def retrieve_nearest(pool: np.ndarray, seed_sets: Sequence[np.ndarray], k: int, candidates: np.ndarray | None = None,
                     ivf_min_size: int = 250_000, nprobe: int = 32) -> RetrievalResult:
    """The k nearest pool images (cosine) of every seed image.

    `candidates` restricts the pool to these indices (e.g. the dedup survivors). A pool image
    found by several seeds keeps the provenance of its most similar one.
    """
    check_embeddings(pool, "pool embeddings")
    _require_seed_sets(seed_sets)
    rows = np.arange(pool.shape[0]) if candidates is None else np.asarray(candidates, dtype=np.int64)
    index = inner_product_index(pool, ivf_min_size, nprobe, rows=rows)
    found = []
    for s, seeds in enumerate(seed_sets):
        _check_seeds(seeds, pool, s)
        for pos, scores, ids in search(index, seeds, k):
            seed_ids = np.broadcast_to(np.arange(pos, pos + len(ids))[:, None], ids.shape)
            valid = ids >= 0
            found.append((rows[ids[valid]], np.full(valid.sum(), s), seed_ids[valid], scores[valid]))
    pool_ids, set_ids, seed_ids, scores = (np.concatenate(column) for column in zip(*found))
    best = _first_per_index(pool_ids, -scores)
    return RetrievalResult(pool_ids[best], set_ids[best], seed_ids[best], scores[best].astype(np.float32),
                           np.full(len(best), -1, dtype=np.int64))


def retrieve_by_clusters(seed_sets: Sequence[np.ndarray], centroids: np.ndarray, pool_assignment: np.ndarray,
                         min_seeds_per_cluster: int, images_per_cluster: int, seed: int = 0) -> RetrievalResult:
    """Random images of every pool cluster holding more than `min_seeds_per_cluster` seeds of one set.

    `pool_assignment[i]` is the cluster of pool item i (e.g. a k-means level's assignment);
    items outside the curation (dropped by dedup) can be marked -1.
    """
    _require_seed_sets(seed_sets)
    rng = np.random.default_rng(seed)
    n_clusters = centroids.shape[0]
    order = np.lexsort((rng.random(len(pool_assignment)), pool_assignment))
    rank = rank_within_groups(pool_assignment[order])
    taken = []
    for s, seeds in enumerate(seed_sets):
        check_embeddings(seeds, f"seed set {s}")
        if seeds.shape[1] != centroids.shape[1]:
            raise DataError(f"seed set {s} has {seeds.shape[1]}-d embeddings but the clusters are "
                            f"{centroids.shape[1]}-d; embed it with the pool's backbone")
        seed_clusters, _ = nearest_centroid(seeds, centroids)
        chosen = np.flatnonzero(np.bincount(seed_clusters, minlength=n_clusters) > min_seeds_per_cluster)
        log.info("retrieval: seed set %d selects %d clusters", s, len(chosen))
        picked = order[np.isin(pool_assignment[order], chosen) & (rank < images_per_cluster)]
        taken.append((picked, np.full(len(picked), s)))
    pool_ids = np.concatenate([p for p, _ in taken])
    set_ids = np.concatenate([s for _, s in taken])
    first = _first_per_index(pool_ids, set_ids)
    n = len(first)
    return RetrievalResult(pool_ids[first], set_ids[first], np.full(n, -1, dtype=np.int64),
                           np.full(n, np.nan, dtype=np.float32), pool_assignment[pool_ids[first]])


def retrieval_curation(pool: np.ndarray, seed_sets: Sequence[np.ndarray], cfg: RetrievalConfig,
                       candidates: np.ndarray | None = None, centroids: np.ndarray | None = None,
                       pool_assignment: np.ndarray | None = None, seed: int = 0) -> RetrievalResult:
    """Run the mode `cfg` (a `RetrievalConfig`) asks for; cluster mode needs a pool clustering."""
    if not cfg.cluster_based:
        return retrieve_nearest(pool, seed_sets, cfg.k, candidates, cfg.ivf_min_size, cfg.nprobe)
    if centroids is None or pool_assignment is None:
        raise ConfigError("curation.retrieval.cluster_based=true needs the pool's clusters; run the kmeans stage "
                          "first or set cluster_based=false")
    if candidates is not None:
        pool_assignment = np.where(np.isin(np.arange(len(pool_assignment)), candidates), pool_assignment, -1)
    return retrieve_by_clusters(seed_sets, centroids, pool_assignment, cfg.min_seeds_per_cluster,
                                cfg.images_per_cluster, seed)


def _require_seed_sets(seed_sets: Sequence[np.ndarray]) -> None:
    if len(seed_sets) == 0:
        raise ConfigError("curation.retrieval.seed_sets is empty; give the embeddings of at least one seed dataset")


def _check_seeds(seeds: np.ndarray, pool: np.ndarray, s: int) -> None:
    check_embeddings(seeds, f"seed set {s}")
    if seeds.shape[1] != pool.shape[1]:
        raise DataError(f"seed set {s} has {seeds.shape[1]}-d embeddings but the pool has {pool.shape[1]}-d; "
                        "embed it with the pool's backbone")


def _first_per_index(pool_ids: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Positions of the entry with the smallest `priority` for each distinct pool index, ascending by index."""
    order = np.lexsort((priority, pool_ids))
    first = np.r_[True, pool_ids[order][1:] != pool_ids[order][:-1]] if len(order) else np.zeros(0, dtype=bool)
    return order[first]
