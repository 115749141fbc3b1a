"""Hierarchical k-means with resampling (Vo et al. 2024).

Level 1 clusters the points; level l clusters the centroids of level l-1. Within a level, after
a first k-means, each resampling step keeps the `sample_size` points of every cluster closest
to its centroid (or random ones), runs a fresh k-means on the union of those points, and
reassigns every item to the new centroids. Re-seeding on those points pulls centroids off the
dense regions, so the clusters of the top levels cover the data's modes about evenly. Every
k-means is greedy k-means++ seeding as Vo et al. (`seeding`) followed by Lloyd iterations
(`lloyd`, whose searches in many dimensions may run in bf16); faiss does every assignment. Optionally each first-level
cluster is split into `n_split` smaller ones (their `n_splits`), which is how a pool of
hundreds of millions gets millions of first-level clusters.

For pools that do not fit one machine, level 1 trains on `train_sample` points and every full
assignment goes through `assign_all`, which a SLURM array can implement with `assign_slice`
on row slices and `merge_assignment_slices`.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dinoscale.curation.config import KMeansConfig
from dinoscale.curation.faiss_utils import check_embeddings, nearest_centroid
from dinoscale.curation.lloyd import lloyd
from dinoscale.curation.seeding import seed_rows
from dinoscale.errors import ConfigError, DataError
from dinoscale.utils.io import atomic_dir, save_npy
from dinoscale.utils.logging import get_logger, progress
from dinoscale.utils.stages import MARKER, is_done, mark_done

log = get_logger(__name__)

AssignFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class ClusterLevel:
    """One level of the tree: `assignment[i]` is the cluster of item i of the level below."""

    centroids: np.ndarray  # (n_clusters, D)
    assignment: np.ndarray  # (n_items,) int64; items are points for the first level
    distances: np.ndarray  # (n_items,) float32 squared L2 distance of each item to its centroid

    @property
    def n_clusters(self) -> int:
        return self.centroids.shape[0]


@dataclass
class ClusterTree:
    """The levels of hierarchical k-means, finest first."""

    levels: list[ClusterLevel]

    @property
    def n_points(self) -> int:
        return len(self.levels[0].assignment)

    def point_clusters(self) -> np.ndarray:
        """(n_points, n_levels) int64: the cluster of each original point at every level."""
        labels = [self.levels[0].assignment]
        for level in self.levels[1:]:
            labels.append(level.assignment[labels[-1]])
        return np.stack(labels, axis=1)

    def save(self, directory: str | Path) -> None:
        """Write every level to `directory/level_<i>/` atomically."""
        for i, level in enumerate(self.levels):
            _save_level(Path(directory) / f"level_{i}", level, key={})

    @classmethod
    def load(cls, directory: str | Path) -> "ClusterTree":
        directory = Path(directory)
        levels = []
        while (directory / f"level_{len(levels)}" / MARKER).exists():
            levels.append(_load_level(directory / f"level_{len(levels)}"))
        if not levels:
            raise DataError(f"no cluster tree in '{directory}' (expected level_0/{MARKER}); run the kmeans stage")
        return cls(levels)


def assign_slice(embeddings: np.ndarray, centroids: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid and squared distance for rows start:stop (one task of a parallel assignment)."""
    check_embeddings(embeddings, "embeddings")
    if not 0 <= start <= stop <= embeddings.shape[0]:
        raise DataError(f"slice {start}:{stop} is outside the {embeddings.shape[0]} rows of the embeddings")
    return nearest_centroid(embeddings, centroids, start, stop)


def merge_assignment_slices(parts: Sequence[tuple[int, np.ndarray, np.ndarray]], n_points: int
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Join (start, assignment, distances) slices that must tile rows 0:n_points exactly."""
    assignment = np.empty(n_points, dtype=np.int64)
    distances = np.empty(n_points, dtype=np.float32)
    expected = 0
    for start, part_assignment, part_distances in sorted(parts, key=lambda p: p[0]):
        if start != expected:
            what = "overlap" if start < expected else "missing"
            raise DataError(f"assignment slices: rows {min(start, expected)}:{max(start, expected)} {what}; "
                            "rerun the array tasks of those rows")
        stop = start + len(part_assignment)
        assignment[start:stop] = part_assignment
        distances[start:stop] = part_distances
        expected = stop
    if expected != n_points:
        raise DataError(f"assignment slices: rows {expected}:{n_points} missing; rerun the array tasks of those rows")
    return assignment, distances


def fit_hierarchical_kmeans(x: np.ndarray, cfg: KMeansConfig, checkpoint_dir: str | Path | None = None, seed: int = 0,
                            assign_all: AssignFn | None = None) -> ClusterTree:
    """Fit the tree on the rows of `x` (an (N, D) array, memory-mapped is fine).

    `cfg` is a `KMeansConfig`. With `checkpoint_dir`, each finished level is written there
    atomically and a re-run with the same data, config and seed loads it instead of refitting.
    `assign_all(centroids) -> (assignment, squared distances)` over all N points replaces the
    in-process chunked assignment of level 1 (e.g. by a SLURM array over `assign_slice`).
    """
    check_embeddings(x, "embeddings")
    _check_config(cfg, x.shape[0])
    assign_points = assign_all or (lambda centroids: nearest_centroid(x, centroids))
    fingerprint = _data_fingerprint(x)
    levels: list[ClusterLevel] = []
    for i in range(len(cfg.n_clusters)):
        key = _level_key(cfg, i, seed, fingerprint)
        level_dir = Path(checkpoint_dir) / f"level_{i}" if checkpoint_dir is not None else None
        if level_dir is not None and is_done(level_dir, key):
            log.info("k-means level %d: loaded from %s", i + 1, level_dir)
            levels.append(_load_level(level_dir))
            continue
        rng = np.random.default_rng((seed, i))
        if i == 0:
            items, assign_items = x, assign_points
        else:
            items = levels[-1].centroids
            assign_items = lambda centroids, items=items: nearest_centroid(items, centroids)  # noqa: E731
        level = _fit_level(items, assign_items, cfg, i, rng)
        if i == 0 and cfg.n_split > 1:
            level = _split_clusters(x, level, cfg, rng)
        level = _drop_empty_clusters(level)
        log.info("k-means level %d: %d clusters of %d items", i + 1, level.n_clusters, len(level.assignment))
        if level_dir is not None:
            _save_level(level_dir, level, key)
        levels.append(level)
    if checkpoint_dir is not None:
        _remove_levels_from(Path(checkpoint_dir), len(levels))
    return ClusterTree(levels)


# ----------------------------------------------------------------------------- one level
def _fit_level(items: np.ndarray, assign_items: AssignFn, cfg: KMeansConfig, i: int, rng: np.random.Generator) -> ClusterLevel:
    n_items = items.shape[0]
    k = min(cfg.n_clusters[i], n_items)
    if k < cfg.n_clusters[i]:
        log.warning("k-means level %d: %d clusters asked for %d items; using %d", i + 1, cfg.n_clusters[i], n_items, k)
    train_rows = np.arange(n_items)
    if i == 0 and cfg.train_sample is not None and cfg.train_sample < n_items:
        train_rows = np.sort(rng.choice(n_items, size=cfg.train_sample, replace=False))
    centroids = _kmeans(items[train_rows], k, cfg, rng)
    assignment, distances = assign_items(centroids)
    sample_size = cfg.sample_size[i]
    steps = cfg.n_resampling_steps[i] if sample_size > 1 else 0
    for _ in progress(range(steps), desc=f"k-means level {i + 1} resampling", total=steps):
        picked = _resampling_picks(assignment, distances, sample_size, cfg.resampling_strategy, rng)
        centroids = _kmeans(items[picked], k, cfg, rng)
        assignment, distances = assign_items(centroids)
    return ClusterLevel(centroids, assignment, distances)


def _kmeans(points: np.ndarray, k: int, cfg: KMeansConfig, rng: np.random.Generator) -> np.ndarray:
    """Seeded Lloyd k-means on all of `points`; centroids in `cfg.dtype`."""
    points = np.ascontiguousarray(points, dtype=np.float32)
    k = min(k, points.shape[0])
    if cfg.init == "kmeans++":
        seeds = seed_rows(points, k, rng, cfg.seeding_points_per_cluster)
    else:
        seeds = np.sort(rng.choice(len(points), size=k, replace=False))
    return lloyd(points, points[seeds], cfg.n_iter, cfg.lloyd_precision).astype(cfg.dtype)


def _resampling_picks(assignment: np.ndarray, distances: np.ndarray, sample_size: int, strategy: str,
                      rng: np.random.Generator) -> np.ndarray:
    """Indices of up to `sample_size` items per cluster: the closest to the centroid, or random ones."""
    rank_key = distances if strategy == "closest" else rng.random(len(assignment))
    order = np.lexsort((rank_key, assignment))
    rank = rank_within_groups(assignment[order])
    return np.sort(order[rank < sample_size])


def rank_within_groups(sorted_groups: np.ndarray) -> np.ndarray:
    """For a sorted array of group ids: the position of each element inside its group."""
    if len(sorted_groups) == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    sizes = np.diff(np.r_[starts, len(sorted_groups)])
    return np.arange(len(sorted_groups)) - np.repeat(starts, sizes)


def _split_clusters(x: np.ndarray, level: ClusterLevel, cfg: KMeansConfig, rng: np.random.Generator) -> ClusterLevel:
    """Replace each cluster by up to `cfg.n_split` sub-clusters found by k-means on its own points."""
    order = np.argsort(level.assignment, kind="stable")
    bounds = np.searchsorted(level.assignment[order], np.arange(level.n_clusters + 1))
    assignment = np.empty_like(level.assignment)
    distances = np.empty_like(level.distances)
    centroids = []
    n_done = 0
    for c in progress(range(level.n_clusters), desc="splitting level-1 clusters", total=level.n_clusters):
        members = order[bounds[c]:bounds[c + 1]]
        if len(members) == 0:
            continue
        points = np.ascontiguousarray(x[members], dtype=np.float32)
        sub_centroids = _kmeans(points, cfg.n_split, cfg, rng)
        sub_assignment, sub_distances = nearest_centroid(points, sub_centroids)
        assignment[members] = n_done + sub_assignment
        distances[members] = sub_distances
        centroids.append(sub_centroids)
        n_done += len(sub_centroids)
    return ClusterLevel(np.concatenate(centroids), assignment, distances)


def _drop_empty_clusters(level: ClusterLevel) -> ClusterLevel:
    """Renumber clusters 0..K-1 over the non-empty ones (centroids trained on a sample can end empty)."""
    used = np.flatnonzero(np.bincount(level.assignment, minlength=level.n_clusters))
    if len(used) == level.n_clusters:
        return level
    new_id = np.full(level.n_clusters, -1, dtype=np.int64)
    new_id[used] = np.arange(len(used))
    return ClusterLevel(level.centroids[used], new_id[level.assignment], level.distances)


# ----------------------------------------------------------------------------- config and checkpoints
def _check_config(cfg: KMeansConfig, n_points: int) -> None:
    n_levels = len(cfg.n_clusters)
    if n_levels == 0:
        raise ConfigError("curation.kmeans.n_clusters is empty; give one cluster count per level, e.g. [1000, 100]")
    for name in ("n_resampling_steps", "sample_size"):
        if len(getattr(cfg, name)) != n_levels:
            raise ConfigError(f"curation.kmeans.{name} has {len(getattr(cfg, name))} entries but n_clusters has "
                              f"{n_levels}; give one value per level")
    for name in ("n_clusters", "sample_size"):
        if min(getattr(cfg, name)) < 1:
            raise ConfigError(f"curation.kmeans.{name} = {list(getattr(cfg, name))} must be >= 1 at every level")
    if min(cfg.n_resampling_steps) < 0:
        raise ConfigError(f"curation.kmeans.n_resampling_steps = {list(cfg.n_resampling_steps)} must be >= 0")
    if cfg.train_sample is not None and cfg.train_sample < min(cfg.n_clusters[0], n_points):
        raise ConfigError(f"curation.kmeans.train_sample = {cfg.train_sample} is smaller than the "
                          f"{cfg.n_clusters[0]} first-level clusters; raise it or set it to null")


def _plain_config(cfg: KMeansConfig) -> dict:
    plain = {name: list(getattr(cfg, name)) for name in ("n_clusters", "n_resampling_steps", "sample_size")}
    for name in ("resampling_strategy", "n_iter", "init", "seeding_points_per_cluster", "n_split", "train_sample",
                 "dtype", "lloyd_precision"):
        plain[name] = getattr(cfg, name)
    return plain


def _level_key(cfg: KMeansConfig, i: int, seed: int, fingerprint: str) -> dict:
    """What level i depends on: the data, the seed, and the settings of levels 0..i."""
    plain = _plain_config(cfg)
    for name in ("n_clusters", "n_resampling_steps", "sample_size"):
        plain[name] = plain[name][:i + 1]
    return {"config": plain, "seed": seed, "data": fingerprint}


def _data_fingerprint(x: np.ndarray) -> str:
    """Shape, dtype and the bytes of up to 64 evenly spaced rows: cheap even on a memory map."""
    rows = np.unique(np.linspace(0, x.shape[0] - 1, num=min(64, x.shape[0])).astype(np.int64))
    digest = hashlib.sha256(f"{x.shape}{x.dtype}".encode())
    digest.update(np.ascontiguousarray(x[rows]).tobytes())
    return digest.hexdigest()[:16]


def _save_level(level_dir: Path, level: ClusterLevel, key: dict) -> None:
    with atomic_dir(level_dir) as tmp:
        save_npy(tmp / "centroids.npy", level.centroids)
        save_npy(tmp / "assignment.npy", level.assignment)
        save_npy(tmp / "distances.npy", level.distances)
        mark_done(tmp, key, {"n_clusters": level.n_clusters, "n_items": len(level.assignment)})


def _load_level(level_dir: Path) -> ClusterLevel:
    return ClusterLevel(np.load(level_dir / "centroids.npy"), np.load(level_dir / "assignment.npy"),
                        np.load(level_dir / "distances.npy"))


def _remove_levels_from(directory: Path, first: int) -> None:
    """Delete level folders left by an earlier run that had more levels."""
    while (directory / f"level_{first}").exists():
        shutil.rmtree(directory / f"level_{first}")
        first += 1
