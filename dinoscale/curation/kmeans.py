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

The fit is data-parallel over the ranks of a process group (torchrun, a multi-task SLURM job; a
single process is a world of one): every rank reads its own contiguous blocks of rows, memory-
mapped, and the ranks exchange only what they must (`seeding`, `lloyd`, `collective`); the upper
levels, whose items are the centroids below, are shared out the same way. The first level can
fit on all points; `train_sample` fits its first k-means on a sample instead (resampling steps
and assignments still see every point). For the same seed and data, any number of ranks gives
the same tree. With a checkpoint folder each finished level is written there, so a killed job
resumes at the first unfinished level, on any number of ranks. `assign_slice` and
`merge_assignment_slices` assign rows in independent slices (a SLURM array).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dinoscale.curation.collective import Comm, block_range, block_uniforms, smallest_in_groups
from dinoscale.curation.config import KMeansConfig
from dinoscale.curation.faiss_utils import check_embeddings, nearest_centroid
from dinoscale.curation.lloyd import lloyd
from dinoscale.curation.points import Points
from dinoscale.curation.seeding import seed_rows
from dinoscale.curation.store import data_fingerprint
from dinoscale.errors import ConfigError, DataError
from dinoscale.utils.io import atomic_dir, save_npy
from dinoscale.utils.logging import get_logger, progress
from dinoscale.utils.stages import MARKER, is_done, mark_done

log = get_logger(__name__)


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

    def point_clusters(self, rows: range | None = None) -> np.ndarray:
        """(n_points, n_levels) int64: the cluster of each original point (of `rows` only, if given) at
        every level."""
        labels = [np.asarray(self.levels[0].assignment if rows is None else self.levels[0].assignment[rows.start:rows.stop])]
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


def fit_hierarchical_kmeans(x: Any, cfg: KMeansConfig, checkpoint_dir: str | Path | None = None, seed: int = 0
                            ) -> ClusterTree:
    """Fit the tree on the rows of `x` (an (N, D) array-like: a memory map or a row store is read
    block by block, never whole), on every rank of the process group; returns the whole tree.

    With `checkpoint_dir` (which every rank must see), each finished level is written there
    atomically and a re-run with the same data, config and seed loads it instead of refitting.
    """
    check_embeddings(x, "embeddings")
    _check_config(cfg, x.shape[0])
    comm = Comm.current()
    fingerprint = data_fingerprint(x)
    comm.check_same({"rows": x.shape[0], "dim": x.shape[1], "data": fingerprint, "seed": seed,
                     "config": _plain_config(cfg)}, "k-means input",
                    "every rank must read the same embeddings, from a file system they all share, with the same "
                    "config and seed")
    points = Points.of(x, comm)
    levels: list[ClusterLevel] = []
    for i in range(len(cfg.n_clusters)):
        key = _level_key(cfg, i, seed, fingerprint)
        level_dir = Path(checkpoint_dir) / f"level_{i}" if checkpoint_dir is not None else None
        if level_dir is not None and comm.broadcast(is_done(level_dir, key)):
            log.info("k-means level %d: loaded from %s", i + 1, level_dir)
            levels.append(_load_level(level_dir))
            continue
        rng = np.random.default_rng((seed, i))
        items = points if i == 0 else Points.of(levels[-1].centroids, comm)
        centroids, assignment, distances = _fit_level(items, cfg, i, rng)
        if i == 0 and cfg.n_split > 1:
            centroids, assignment, distances = _split_clusters(items, centroids, assignment, cfg, seed)
        level = _drop_empty_clusters(ClusterLevel(centroids, comm.concat(assignment), comm.concat(distances)))
        log.info("k-means level %d: %d clusters of %d items", i + 1, level.n_clusters, len(level.assignment))
        if level_dir is not None:
            if comm.is_main:
                _save_level(level_dir, level, key)
            comm.barrier()
        levels.append(level)
    if checkpoint_dir is not None and comm.is_main:
        _remove_levels_from(Path(checkpoint_dir), len(levels))
    comm.barrier()
    return ClusterTree(levels)


# ----------------------------------------------------------------------------- one level
def _fit_level(items: Points, cfg: KMeansConfig, i: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centroids of level i, and this rank's items' assignment and squared distances to them."""
    k = min(cfg.n_clusters[i], items.n)
    if k < cfg.n_clusters[i]:
        log.warning("k-means level %d: %d clusters asked for %d items; using %d", i + 1, cfg.n_clusters[i], items.n, k)
    train = items
    if i == 0 and cfg.train_sample is not None and cfg.train_sample < items.n:
        train = items.take(np.sort(rng.choice(items.n, size=cfg.train_sample, replace=False)))
    centroids = _kmeans(train, k, cfg, rng)
    assignment, distances = assign_points(items, centroids)
    sample_size = cfg.sample_size[i]
    steps = cfg.n_resampling_steps[i] if sample_size > 1 else 0
    for _ in progress(range(steps), desc=f"k-means level {i + 1} resampling", total=steps):
        picked = _resampling_picks(items, assignment, distances, sample_size, cfg.resampling_strategy, rng)
        centroids = _kmeans(items.select(picked), k, cfg, rng)
        assignment, distances = assign_points(items, centroids)
    return centroids, assignment, distances


def assign_points(points: Points, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid and squared distance of each of this rank's points, block by block."""
    assignment = np.empty(points.n_local, dtype=np.int64)
    distances = np.empty(points.n_local, dtype=np.float32)
    for where, rows in points.read_blocks():
        assignment[where], distances[where] = nearest_centroid(rows, centroids)
    return assignment, distances


def _kmeans(points: Points, k: int, cfg: KMeansConfig, rng: np.random.Generator) -> np.ndarray:
    """Seeded Lloyd k-means on all of `points`; centroids in `cfg.dtype`. Points that one rank holds
    alone (at most one block) are fitted by that rank alone, which sends the others the centroids and
    its generator's state: the same fit, without an exchange per step."""
    if points.sole_holder() is not None:
        return points.on_sole_holder(lambda alone: _kmeans(alone, k, cfg, rng), rng)
    k = min(k, points.n)
    if cfg.init == "kmeans++":
        seeds = seed_rows(points, k, rng, cfg.seeding_points_per_cluster)
    else:
        seeds = np.sort(rng.choice(points.n, size=k, replace=False))
    return lloyd(points, points.gather(seeds), cfg.n_iter, cfg.lloyd_precision).astype(cfg.dtype)


def _resampling_picks(items: Points, assignment: np.ndarray, distances: np.ndarray, sample_size: int,
                      strategy: str, rng: np.random.Generator) -> np.ndarray:
    """Which of this rank's items are among the `sample_size` of their cluster closest to its
    centroid (or with the smallest random keys), over all ranks; ties go to the smaller index."""
    rank_key = distances if strategy == "closest" else block_uniforms(items.rows, int(rng.integers(2 ** 63)))
    n_clusters = int(items.comm.max(np.array([assignment.max(initial=-1)]))[0]) + 1
    quota = np.full(n_clusters, sample_size, dtype=np.int64)
    return smallest_in_groups(assignment, rank_key, quota, items.rows.start, items.comm)


def _split_clusters(points: Points, centroids: np.ndarray, assignment: np.ndarray, cfg: KMeansConfig, seed: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replace each cluster by up to `cfg.n_split` sub-clusters found by k-means on its own points.

    Clusters are dealt out to ranks in contiguous ranges of ids; their points travel to the rank
    of their cluster, which fits each one alone (seeded by the cluster's id, so on any world size)
    and sends each point its sub-cluster back. Returns the sub-centroids (cluster by cluster) and
    this rank's points' sub-cluster and squared distance."""
    comm, n_clusters = points.comm, len(centroids)
    positions = np.arange(points.rows.start, points.rows.stop)
    order = np.lexsort((positions, assignment))
    owner_of_cluster = np.searchsorted([block_range(n_clusters, r, comm.world, 1).stop for r in range(comm.world)],
                                       assignment[order], side="right")
    cuts = np.searchsorted(owner_of_cluster, np.arange(1, comm.world))
    rows = points.local()[order]
    labels = np.stack([assignment[order], positions[order]], axis=1)
    members = np.concatenate(comm.exchange(np.split(rows, cuts)))
    member_labels = np.concatenate(comm.exchange(np.split(labels, cuts)))
    by_cluster = np.argsort(member_labels[:, 0], kind="stable")  # senders sent by position, in rank order
    members, member_labels = members[by_cluster], member_labels[by_cluster]

    sub_centroids, sub_assignment, sub_distances, n_subs = [], [], [], []
    mine = block_range(n_clusters, comm.rank, comm.world, 1)
    bounds = np.searchsorted(member_labels[:, 0], np.arange(mine.start, mine.stop + 1))
    for c, lo, hi in progress(zip(mine, bounds[:-1], bounds[1:]), "splitting level-1 clusters", total=len(mine)):
        if hi == lo:
            n_subs.append(0)
            continue
        cluster = Points.of(members[lo:hi], Comm())
        found = _kmeans(cluster, cfg.n_split, cfg, np.random.default_rng((seed, 0, c)))
        ids, distances = nearest_centroid(members[lo:hi], found)
        sub_centroids.append(found)
        sub_assignment.append(ids)
        sub_distances.append(distances)
        n_subs.append(len(found))
    first_sub = np.concatenate([[0], np.cumsum(comm.concat(np.array(n_subs, dtype=np.int64)))])
    offsets = np.repeat(first_sub[mine.start:mine.stop], np.diff(bounds))
    local_ids = np.concatenate([np.zeros(0, dtype=np.int64), *sub_assignment]) + offsets
    all_centroids = comm.concat(np.concatenate([np.zeros((0, points.dim), dtype=cfg.dtype), *sub_centroids]))

    # back to the ranks that own the points
    owner_of_point = np.searchsorted([block_range(points.n, r, comm.world).stop for r in range(comm.world)],
                                     member_labels[:, 1], side="right")
    back = np.argsort(owner_of_point, kind="stable")
    cuts = np.searchsorted(owner_of_point[back], np.arange(1, comm.world))
    answer = np.stack([member_labels[back, 1], local_ids[back]], axis=1)
    distances = np.concatenate([np.zeros(0, dtype=np.float32), *sub_distances])[back]
    answer = np.concatenate(comm.exchange(np.split(answer, cuts)))
    distances = np.concatenate(comm.exchange(np.split(distances, cuts)))
    new_assignment = np.empty(points.n_local, dtype=np.int64)
    new_distances = np.empty(points.n_local, dtype=np.float32)
    new_assignment[answer[:, 0] - points.rows.start] = answer[:, 1]
    new_distances[answer[:, 0] - points.rows.start] = distances
    return all_centroids, new_assignment, new_distances


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
