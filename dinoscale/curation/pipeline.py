"""The curation stage runner: embed -> dedup -> kmeans -> assign -> sample -> shards -> report.

Each stage writes into its own folder under `curation.output_dir` and finishes with a
`_SUCCESS.json` marker holding the hash of everything its output depends on (its config
section, the seed and the marker hash of the stage before), so a re-run skips finished stages
and redoes a stage that was killed or whose inputs changed.

`embed`, `assign` and `shards` are parallel: `run_stage(cfg, name, slice=(i, n))` does slice i
of n (one SLURM array task) and `merge_stage(cfg, name, n)` joins them. Slices are cut on fixed
block boundaries (embedding batches, assignment blocks, whole shards), so the merged output is
byte-identical to a single-process run whatever n is. `run_stage(cfg, name)` without a slice
merges a complete set of slices already on disk, or runs the stage as one slice.

The embed stage's slices stay where they were written: merging lists them as one row store
(`store`), which the later stages read through memory maps, each rank its own rows.

`dedup`, `kmeans` and `sample` are collective: under torchrun or a multi-task SLURM job
(`launch.curation_ranks`) every rank runs them on its own blocks of rows and exchanges what it
must, and rank 0 writes the output; the parallel stages then run one slice per rank, merged by
rank 0, and `report` runs on rank 0. The results are those of a single process. The k-means tree
is fitted on the dedup survivors (its first k-means on `kmeans.train_sample` of them, if set);
the `assign` stage then puts every survivor in its nearest first-level cluster, in parallel.
Sampling, retrieval (when `retrieval.seed_sets` are given) and the shards use that assignment.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
from omegaconf import DictConfig, OmegaConf

from dinoscale.config import config_hash
from dinoscale.curation import embed as embedding
from dinoscale.curation.collective import Comm, block_range
from dinoscale.curation.dedup import (DedupResult, check_threshold, deduplicate, load_dedup_result,
                                     save_dedup_result)
from dinoscale.curation.kmeans import (ClusterLevel, ClusterTree, assign_slice, fit_hierarchical_kmeans,
                                       merge_assignment_slices)
from dinoscale.curation.launch import curation_ranks
from dinoscale.curation.report import write_curation_report, write_dedup_report
from dinoscale.curation.retrieval import retrieval_curation
from dinoscale.curation.sampling import hierarchical_sample
from dinoscale.curation.shards import Selection, write_manifest, write_shard_slice
from dinoscale.curation.store import RowStore, RowSubset
from dinoscale.data.pool import ImagePool, open_pool
from dinoscale.errors import ConfigError, DataError
from dinoscale.utils.io import atomic_dir, read_json, save_npy, write_json
from dinoscale.utils.logging import get_logger
from dinoscale.utils.stages import is_done, mark_done, read_marker

log = get_logger(__name__)

STAGES = ("embed", "dedup", "kmeans", "assign", "sample", "shards", "report")
PARALLEL_STAGES = ("embed", "assign", "shards")
COLLECTIVE_STAGES = ("dedup", "kmeans", "sample")
SLICES = "parts"
SLICE_NAME = re.compile(r"\d{5}-of-(\d{5})")  # killed writes leave hidden '.NAME.xxx.tmp' folders beside
ASSIGN_BLOCK_ROWS = 16384  # assignment work unit: slices are runs of whole blocks

Slice = tuple[int, int]


# ----------------------------------------------------------------------------- public API
def list_stages(cfg: DictConfig) -> list[str]:
    """The stages this config runs, in order (no shards without a pool of images to write)."""
    return [name for name in STAGES if name != "shards" or cfg.curation.pool]


def stage_is_parallel(name: str) -> bool:
    _check_stage_name(name)
    return name in PARALLEL_STAGES


def stage_dir(cfg: DictConfig, name: str) -> Path:
    _check_stage_name(name)
    return Path(cfg.curation.output_dir) / name


def stage_is_done(cfg: DictConfig, name: str) -> bool:
    return is_done(stage_dir(cfg, name), _Run(cfg).key(name))


def run_stage(cfg: DictConfig, name: str, slice: Slice | None = None) -> dict:
    """Run one stage (or one slice of a parallel stage) unless it is done; returns its counts.
    On every rank of a process group: see the module docstring."""
    _check_stage_name(name)
    comm = Comm.current()
    if slice is not None and not stage_is_parallel(name):
        raise ConfigError(f"stage '{name}' runs in one process; only {', '.join(PARALLEL_STAGES)} take --slice")
    if slice is not None and comm.world > 1:
        raise ConfigError(f"--slice runs one slice in one process; under torchrun or a multi-task job the "
                          f"{comm.world} ranks share stage '{name}' out themselves: drop --slice")
    run = _Run(cfg)
    run.require_upstream(name)
    if comm.broadcast(is_done(run.dir(name), run.key(name))):
        log.info("%s: already done, skipping", name)
        return read_marker(run.dir(name))["counts"]
    if slice is not None:
        return run.run_slice(name, *_check_slice(slice))
    if stage_is_parallel(name):
        n = comm.world if comm.world > 1 else run.complete_slice_count(name) or 1
        if comm.world > 1 or n == 1:
            run.run_slice(name, comm.rank, n)
        comm.barrier()
        counts = merge_stage(cfg, name, n) if comm.is_main else None
        return comm.broadcast(counts)
    start = time.perf_counter()
    counts = STAGE_BODIES[name](run) if name in COLLECTIVE_STAGES or comm.is_main else None
    if comm.is_main:
        mark_done(run.dir(name), run.key(name), counts, time.perf_counter() - start)
        log.info("%s: done %s", name, counts)
    comm.barrier()
    return comm.broadcast(counts)


def merge_stage(cfg: DictConfig, name: str, n: int) -> dict:
    """Join slices 0..n-1 of a parallel stage and mark the stage done."""
    if not stage_is_parallel(name):
        raise ConfigError(f"stage '{name}' has no slices to merge")
    run = _Run(cfg)
    if is_done(run.dir(name), run.key(name)):
        return read_marker(run.dir(name))["counts"]
    missing = [i for i in range(n) if not is_done(run.slice_dir(name, i, n), run.key(name))]
    if missing:
        raise DataError(f"stage '{name}': slices {missing[:10]} of {n} are not done; run them with "
                        f"--stage {name} --slice i/{n} before merging")
    start = time.perf_counter()
    counts = MERGERS[name](run, n)
    mark_done(run.dir(name), run.key(name), counts, time.perf_counter() - start)
    kept = {run.slice_dir(name, i, n).name for i in range(n)} if name == "embed" else set()  # the embedding store
    for stale in sorted((run.dir(name) / SLICES).glob("*")) if (run.dir(name) / SLICES).exists() else []:
        if stale.name not in kept:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    if not kept:
        shutil.rmtree(run.dir(name) / SLICES, ignore_errors=True)
    log.info("%s: merged %d slices %s", name, n, counts)
    return counts


def run_curation(cfg: DictConfig, stage: str | None = None, slice: Slice | None = None) -> dict:
    """Run every unfinished stage in order, or only `stage` (and only `slice` of it); on every rank
    when launched as several (torchrun, a multi-task SLURM job)."""
    if stage is None and slice is not None:
        raise ConfigError("--slice needs --stage: name the parallel stage the slice belongs to")
    with curation_ranks(cfg):
        if stage in (None, "embed", "dedup"):
            check_threshold(dedup_embedder(cfg.curation.embed)[0], cfg.curation.dedup.threshold)
        if stage is not None:
            return {stage: run_stage(cfg, stage, slice)}
        return {name: run_stage(cfg, name) for name in list_stages(cfg)}


# ----------------------------------------------------------------------------- shared state of one call
@dataclass
class _Run:
    cfg: DictConfig

    @property
    def cur(self) -> DictConfig:
        return self.cfg.curation

    def dir(self, name: str) -> Path:
        return stage_dir(self.cfg, name)

    def slice_dir(self, name: str, i: int, n: int) -> Path:
        return self.dir(name) / SLICES / f"{i:05d}-of-{n:05d}"

    @cached_property
    def pool(self) -> ImagePool | None:
        return open_pool(self.cur.pool) if self.cur.pool else None

    def require_pool(self, why: str) -> ImagePool:
        if self.pool is None:
            raise ConfigError(f"curation.pool is empty; {why} needs the pool of images")
        return self.pool

    def key(self, name: str) -> dict:
        """Everything the output of stage `name` depends on (its marker stores the hash)."""
        return self._keys[name]

    @cached_property
    def _keys(self) -> dict[str, dict]:
        cur, keys = self.cur, {}
        keys["embed"] = {"source": self._source_fingerprint(), "embed": _plain(cur.embed, drop=("num_workers",))}
        keys["dedup"] = {"up": config_hash(keys["embed"]), "dedup": _plain(cur.dedup),
                         "references": [_path_fingerprint(p) for p in cur.dedup.decontamination_sets]}
        keys["kmeans"] = {"up": config_hash(keys["dedup"]), "kmeans": _plain(cur.kmeans), "seed": self.cfg.seed}
        keys["assign"] = {"up": config_hash(keys["kmeans"])}
        keys["sample"] = {"up": config_hash(keys["assign"]), "sampling": _plain(cur.sampling),
                          "retrieval": _plain(cur.retrieval), "seed": self.cfg.seed,
                          "seeds": [_path_fingerprint(p) for p in cur.retrieval.seed_sets]}
        keys["shards"] = {"up": config_hash(keys["sample"]), "shards": _plain(cur.shards), "seed": self.cfg.seed}
        keys["report"] = {"up": config_hash(keys["sample"]), "examples": cur.report_examples}
        return keys

    def _source_fingerprint(self) -> dict:
        cur = self.cur
        source: dict[str, Any] = {}
        if self.pool is not None:
            digest = hashlib.sha256("\n".join(self.pool.keys).encode()).hexdigest()[:16]
            source["pool"] = {"path": cur.pool, "n_items": len(self.pool), "keys": digest}
        if cur.embed.embeddings_file:
            source["embeddings_file"] = _path_fingerprint(cur.embed.embeddings_file)
        elif cur.embed.backbone not in embedding.MODEL_FREE:
            source["weights"] = _path_fingerprint(str(embedding.backbone_weights(cur.embed.backbone)))
        if cur.embed.copy_detection not in ("", *embedding.MODEL_FREE):
            source["copy_detection"] = _path_fingerprint(str(embedding.backbone_weights(
                cur.embed.copy_detection, "curation.embed.copy_detection")))
        if not source:
            raise ConfigError("nothing to curate: set curation.pool (images) or curation.embed.embeddings_file")
        return source

    def require_upstream(self, name: str) -> None:
        stages = list_stages(self.cfg)
        if name not in stages:
            raise ConfigError(f"stage '{name}' is not part of this run (stages: {', '.join(stages)}); "
                              "the shards stage needs curation.pool")
        for before in STAGES[:STAGES.index(name)]:
            if before in ("shards",) or before not in stages:
                continue
            if not is_done(self.dir(before), self.key(before)):
                raise DataError(f"stage '{name}' needs stage '{before}' finished first (no matching marker in "
                                f"{self.dir(before)}); run `dinoscale curate ... --stage {before}`")

    def complete_slice_count(self, name: str) -> int | None:
        """n of a set of slices 0..n-1 already done for this key (e.g. by an array job), if any."""
        root = self.dir(name) / SLICES
        names = [p.name for p in root.iterdir()] if root.exists() else []
        counts = {int(m.group(1)) for m in map(SLICE_NAME.fullmatch, names) if m}
        for n in sorted(counts, reverse=True):
            if all(is_done(self.slice_dir(name, i, n), self.key(name)) for i in range(n)):
                return n
        return None

    def run_slice(self, name: str, i: int, n: int) -> dict:
        directory = self.slice_dir(name, i, n)
        if is_done(directory, self.key(name)):
            log.info("%s slice %d/%d: already done, skipping", name, i, n)
            return read_marker(directory)["counts"]
        start = time.perf_counter()
        counts = SLICE_BODIES[name](self, i, n, directory)
        log.info("%s slice %d/%d: done in %.1fs %s", name, i, n, time.perf_counter() - start, counts)
        return counts

    # ------------------------------------------------------------------ inputs of later stages
    def embedded(self, name: str = embedding.MAIN) -> RowStore:
        """Array `name` of the embed stage's row store (read through memory maps, row by row)."""
        return RowStore.open(self.dir("embed"), name)

    def embeddings(self) -> RowStore:
        return self.embedded(embedding.MAIN)

    def candidates(self) -> np.ndarray:
        """Pool indices that survive dedup (sorted)."""
        return np.load(self.dir("dedup") / "candidates.npy")

    def tree(self) -> ClusterTree:
        """The fitted tree with its first level assigned over every candidate (memory-mapped)."""
        fitted = ClusterTree.load(self.dir("kmeans") / "levels")
        first = ClusterLevel(fitted.levels[0].centroids, np.load(self.dir("assign") / "assignment.npy", mmap_mode="r"),
                             np.load(self.dir("assign") / "distances.npy", mmap_mode="r"))
        return ClusterTree([first, *fitted.levels[1:]])

    def selection(self) -> Selection:
        directory = self.dir("sample")
        indices = np.load(directory / "selected.npy")
        return Selection(indices, np.load(directory / "cluster_path.npy"), np.load(directory / "source.npy"),
                         read_json(directory / "sources.json"), duplicate_group_of(load_dedup_result(
                             self.dir("dedup")), len(self.embeddings()))[indices])


# ----------------------------------------------------------------------------- embed
def _embed_slice(run: _Run, i: int, n: int, directory: Path) -> dict:
    cur = run.cur.embed
    if run.pool is not None:
        n_items = len(run.pool)
    else:
        n_items = embedding.load_embeddings_file(cur.embeddings_file, None).shape[0]
    rows = embedding.embed_slice_range(n_items, cur.batch_size, i, n)
    embedders = embedding.pool_embedders(cur) if run.pool is not None else {}
    result = embedding.embed_slice(run.pool, rows, embedders, cur.embeddings_file, cur.batch_size, cur.num_workers,
                                   cur.dtype)
    counts = {"start": rows.start, "items": len(rows), "valid": int(result.arrays["valid"].sum()),
              "skipped": result.skipped}
    with atomic_dir(directory) as tmp:
        embedding.save_slice(tmp, result)
        mark_done(tmp, run.key("embed"), counts)
    return counts


def _embed_merge(run: _Run, n: int) -> dict:
    slices = [run.slice_dir("embed", i, n) for i in range(n)]
    counts = embedding.list_slices(slices, run.dir("embed"))
    skipped: dict[str, int] = {}
    for d in slices:
        for reason, k in read_marker(d)["counts"]["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + k
    return {**counts, "skipped": skipped}


# ----------------------------------------------------------------------------- dedup
def dedup_embedder(cur: DictConfig) -> tuple[str, int]:
    """(backbone, image size) of the embedding dedup compares: copy detection if set, else the main one."""
    if cur.copy_detection:
        return cur.copy_detection, cur.copy_detection_image_size
    return ("" if cur.embeddings_file else cur.backbone), cur.image_size


def _dedup(run: _Run) -> dict:
    x = run.embedded(embedding.COPY) if (run.dir("embed") / _first_part(run) / f"{embedding.COPY}.npy").exists() \
        else run.embeddings()
    valid = np.asarray(run.embedded("valid"))
    hashes = _ReadableHashes(run.embedded("content_hashes"), valid) if run.pool is not None else None
    backbone, image_size = dedup_embedder(run.cur.embed)
    references = [embedding.embed_reference_set(p, backbone, image_size, run.cur.embed)
                  for p in run.cur.dedup.decontamination_sets]
    result = deduplicate(x, run.cur.dedup, hashes=hashes, pixel_counts=run.embedded("pixel_counts"),
                         keys=run.pool.keys if run.pool is not None else None, reference_sets=references,
                         seed=run.cfg.seed)
    keep = result.keep & valid
    counts = {**result.counts, "unreadable": int((~valid).sum()), "candidates": int(keep.sum())}
    if Comm.current().is_main:
        with atomic_dir(run.dir("dedup")) as tmp:
            save_dedup_result(DedupResult(keep, result.groups, result.contaminated, result.counts), tmp)
            save_npy(tmp / "candidates.npy", np.flatnonzero(keep).astype(np.int64))
            if run.pool is not None:
                write_dedup_report(tmp, run.pool, result.groups, counts, run.cur.report_examples, run.cfg.seed)
    return counts


def _first_part(run: _Run) -> str:
    return read_json(run.dir("embed") / "rows.json")["parts"][0]["dir"]


class _ReadableHashes:
    """The content hashes, with each unreadable file's replaced by one of its own: unreadable files
    must not be grouped by their (often equal, e.g. empty) bytes."""

    def __init__(self, hashes: RowStore, valid: np.ndarray):
        self.hashes, self.valid = hashes, valid

    def __len__(self) -> int:
        return len(self.hashes)

    def __getitem__(self, rows: slice) -> np.ndarray:
        digests = np.asarray(self.hashes[rows]).astype(object)
        positions = np.arange(len(self.hashes))[rows]
        for j in np.flatnonzero(~self.valid[rows]):
            digests[j] = f"unreadable-{positions[j]}"
        return digests


def duplicate_group_of(result: DedupResult, n_items: int) -> np.ndarray:
    """(N,) id of each item's duplicate group (its index in `result.groups`), -1 for unique items."""
    group = np.full(n_items, -1, dtype=np.int64)
    for g, members in enumerate(result.groups):
        group[members] = g
    return group


# ----------------------------------------------------------------------------- kmeans + assign
def _kmeans(run: _Run) -> dict:
    candidates = run.candidates()
    if len(candidates) == 0:
        raise DataError("no image survived dedup; check curation.dedup.threshold and the embed stage's skips")
    tree = fit_hierarchical_kmeans(RowSubset(run.embeddings(), candidates), run.cur.kmeans,
                                   checkpoint_dir=run.dir("kmeans") / "levels", seed=run.cfg.seed)
    return {"fit_points": len(candidates) if run.cur.kmeans.train_sample is None
            else min(len(candidates), run.cur.kmeans.train_sample),
            "clusters_per_level": [level.n_clusters for level in tree.levels]}


def assign_rows(embeddings: np.ndarray, candidates: np.ndarray, centroids: np.ndarray, rows: range,
                block_rows: int = ASSIGN_BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of candidates[rows], computed block by block on fixed global block boundaries."""
    assignment = np.empty(len(rows), dtype=np.int64)
    distances = np.empty(len(rows), dtype=np.float32)
    for lo in range(rows.start, rows.stop, block_rows):
        hi = min(lo + block_rows, rows.stop)
        block = np.asarray(embeddings[candidates[lo:hi]], dtype=np.float32)
        a, d = assign_slice(block, centroids, 0, hi - lo)
        assignment[lo - rows.start:hi - rows.start], distances[lo - rows.start:hi - rows.start] = a, d
    return assignment, distances


def _assign_slice(run: _Run, i: int, n: int, directory: Path) -> dict:
    candidates = run.candidates()
    rows = block_range(len(candidates), i, n, ASSIGN_BLOCK_ROWS)
    centroids = ClusterTree.load(run.dir("kmeans") / "levels").levels[0].centroids
    assignment, distances = assign_rows(run.embeddings(), candidates, centroids, rows)
    counts = {"start": rows.start, "items": len(rows)}
    with atomic_dir(directory) as tmp:
        save_npy(tmp / "assignment.npy", assignment)
        save_npy(tmp / "distances.npy", distances)
        mark_done(tmp, run.key("assign"), counts)
    return counts


def _assign_merge(run: _Run, n: int) -> dict:
    parts = []
    for i in range(n):
        directory = run.slice_dir("assign", i, n)
        parts.append((read_marker(directory)["counts"]["start"], np.load(directory / "assignment.npy"),
                      np.load(directory / "distances.npy")))
    n_candidates = len(run.candidates())
    assignment, distances = merge_assignment_slices(parts, n_candidates)
    save_npy(run.dir("assign") / "assignment.npy", assignment)
    save_npy(run.dir("assign") / "distances.npy", distances)
    return {"items": n_candidates, "non_empty_clusters": int(len(np.unique(assignment)))}


# ----------------------------------------------------------------------------- sample (+ retrieval)
def _sample(run: _Run) -> dict:
    tree, candidates = run.tree(), run.candidates()
    sampled = hierarchical_sample(tree, run.cur.sampling, seed=run.cfg.seed)
    indices, cluster_path = [candidates[sampled.indices]], [sampled.cluster_path]
    sources, source = ["sampling"], [np.zeros(len(sampled.indices), dtype=np.int64)]
    counts = {"sampled": len(sampled.indices)}
    if run.cur.retrieval.seed_sets:
        backbone = "" if run.cur.embed.embeddings_file else run.cur.embed.backbone
        seed_sets = [embedding.embed_reference_set(p, backbone, run.cur.embed.image_size, run.cur.embed)
                     for p in run.cur.retrieval.seed_sets]
        x = run.embeddings()
        full_assignment = np.full(x.shape[0], -1, dtype=np.int64)
        full_assignment[candidates] = tree.levels[0].assignment
        found = retrieval_curation(x, seed_sets, run.cur.retrieval, candidates=candidates,
                                   centroids=tree.levels[0].centroids, pool_assignment=full_assignment,
                                   seed=run.cfg.seed)
        new = ~np.isin(found.indices, indices[0])
        position = np.searchsorted(candidates, found.indices[new])
        indices.append(found.indices[new])
        cluster_path.append(tree.point_clusters()[position])
        source.append(1 + found.seed_set[new])
        sources += [f"retrieval:{Path(p).name}" for p in run.cur.retrieval.seed_sets]
        counts["retrieved"] = int(new.sum())
    if Comm.current().is_main:
        with atomic_dir(run.dir("sample")) as tmp:
            save_npy(tmp / "selected.npy", np.concatenate(indices).astype(np.int64))
            save_npy(tmp / "cluster_path.npy", np.concatenate(cluster_path).astype(np.int64))
            save_npy(tmp / "source.npy", np.concatenate(source).astype(np.int64))
            write_json(tmp / "sources.json", sources)
    return {**counts, "selected": int(sum(len(i) for i in indices))}


# ----------------------------------------------------------------------------- shards
def _shards_slice(run: _Run, i: int, n: int, directory: Path) -> dict:
    cur = run.cur.shards
    stats = write_shard_slice(run.dir("shards"), run.selection(), run.require_pool("writing shards"),
                              cur.shard_size, cur.image_format, cur.quality, run.cfg.seed, i, n)
    counts = {"shards": stats}
    mark_done(directory, run.key("shards"), counts)
    return counts


def _shards_merge(run: _Run, n: int) -> dict:
    stats: dict[str, dict[str, int]] = {}
    for i in range(n):
        stats.update(read_marker(run.slice_dir("shards", i, n))["counts"]["shards"])
    cur = run.cur.shards
    manifest = write_manifest(run.dir("shards"), run.selection(), run.require_pool("writing shards"), stats,
                              cur.shard_size, cur.image_format, config_hash(run.key("shards")))
    return {key: manifest[key] for key in ("n_items", "n_reencoded", "n_unreadable")} | {
        "n_shards": len(manifest["shards"])}


# ----------------------------------------------------------------------------- report
def _report(run: _Run) -> dict:
    tree, selection = run.tree(), run.selection()
    dedup = load_dedup_result(run.dir("dedup"))
    counts = {name: read_marker(run.dir(name))["counts"] for name in ("embed", "dedup", "sample")}
    with atomic_dir(run.dir("report")) as tmp:
        path = write_curation_report(tmp, run.pool, tree, selection, dedup.groups, run.cur.report_examples, counts)
    return {"report": path.name}


STAGE_BODIES: dict[str, Callable[[_Run], dict]] = {"dedup": _dedup, "kmeans": _kmeans, "sample": _sample,
                                                     "report": _report}
SLICE_BODIES: dict[str, Callable[[_Run, int, int, Path], dict]] = {"embed": _embed_slice,
                                                                    "assign": _assign_slice,
                                                                    "shards": _shards_slice}
MERGERS: dict[str, Callable[[_Run, int], dict]] = {"embed": _embed_merge, "assign": _assign_merge,
                                                    "shards": _shards_merge}


# ----------------------------------------------------------------------------- helpers
def _check_stage_name(name: str) -> None:
    if name not in STAGES:
        raise ConfigError(f"unknown curation stage '{name}'; stages: {', '.join(STAGES)}")


def _check_slice(slice: Slice) -> Slice:
    i, n = slice
    if not (isinstance(i, int) and isinstance(n, int) and 0 <= i < n):
        raise ConfigError(f"slice {i}/{n} is invalid: need 0 <= i < n, e.g. --slice 0/4")
    return i, n


def parse_slice(text: str) -> Slice:
    """'i/n' -> (i, n)."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--slice {text!r} is not of the form i/n (e.g. 0/4)") from None
    return _check_slice((i, n))


def _plain(section: DictConfig, drop: tuple[str, ...] = ()) -> dict:
    plain = OmegaConf.to_container(section, resolve=True)
    return {k: v for k, v in plain.items() if k not in drop}


def _path_fingerprint(path: str) -> dict:
    """Path, size and modification time of a file (of every file below a folder)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{path} does not exist; give an .npy embeddings file or a pool of images")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.relative_to(p) if p.is_dir() else f.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return {"path": str(path), "files": len(files), "stat": digest.hexdigest()[:16]}
