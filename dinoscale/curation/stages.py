"""The bodies of the curation stages (dinoscale/curation/pipeline.py describes and runs them), and
what they share: `CurationRun`, the config and the stages' outputs read back from disk.

A stage body writes its outputs into its folder (atomically) and returns its counts; the runner
writes the marker. A slice body writes into the folder it is given (the runner renames it into
place with its marker) and a merge body joins the slices' folders.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
from omegaconf import DictConfig

from dinoscale.config import config_hash
from dinoscale.curation import embed as embedding
from dinoscale.curation.collective import Comm, block_range
from dinoscale.curation.dedup import DedupResult, deduplicate, load_dedup_result, save_dedup_result
from dinoscale.curation.kmeans import ClusterLevel, ClusterTree, fit_hierarchical_kmeans, merge_assignment_slices
from dinoscale.curation.kmeans import assign_slice as assign_block
from dinoscale.curation.report import write_curation_report, write_dedup_report
from dinoscale.curation.retrieval import retrieval_curation
from dinoscale.curation.sampling import hierarchical_sample
from dinoscale.curation.shards import Selection, write_manifest, write_shard_slice
from dinoscale.curation.store import RowStore, RowSubset
from dinoscale.data.pool import ImagePool, open_pool
from dinoscale.errors import ConfigError, DataError
from dinoscale.utils.io import atomic_dir, read_json, save_npy, write_json
from dinoscale.utils.stages import read_marker

ASSIGN_BLOCK_ROWS = 16384  # assignment work unit: slices are runs of whole blocks


@dataclass
class CurationRun:
    """One call of the pipeline: the config, the stage folders, the pool, and the outputs of finished
    stages. `key(name)` is what stage `name`'s output depends on (computed by the runner)."""

    cfg: DictConfig
    key: Callable[[str], dict]

    @property
    def cur(self) -> DictConfig:
        return self.cfg.curation

    def dir(self, name: str) -> Path:
        return Path(self.cur.output_dir) / name

    @cached_property
    def pool(self) -> ImagePool | None:
        return open_pool(self.cur.pool) if self.cur.pool else None

    def require_pool(self, why: str) -> ImagePool:
        if self.pool is None:
            raise ConfigError(f"curation.pool is empty; {why} needs the pool of images")
        return self.pool

    # ------------------------------------------------------------------ outputs of earlier stages
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


# ----------------------------------------------------------------------------- inputs from outside the pipeline
def source_inputs(run: CurationRun) -> dict:
    """What the embed stage reads: the pool (its keys), precomputed embeddings or the weights files."""
    cur = run.cur
    source: dict[str, Any] = {}
    if run.pool is not None:
        digest = hashlib.sha256("\n".join(run.pool.keys).encode()).hexdigest()[:16]
        source["pool"] = {"path": cur.pool, "n_items": len(run.pool), "keys": digest}
    if cur.embed.embeddings_file:
        source["embeddings_file"] = path_fingerprint(cur.embed.embeddings_file)
    elif cur.embed.backbone not in embedding.MODEL_FREE:
        source["weights"] = path_fingerprint(str(embedding.backbone_weights(cur.embed.backbone)))
    if cur.embed.copy_detection not in ("", *embedding.MODEL_FREE):
        source["copy_detection"] = path_fingerprint(str(embedding.backbone_weights(
            cur.embed.copy_detection, "curation.embed.copy_detection")))
    if not source:
        raise ConfigError("nothing to curate: set curation.pool (images) or curation.embed.embeddings_file")
    return {"source": source}


def reference_inputs(run: CurationRun) -> dict:
    return {"references": [path_fingerprint(p) for p in run.cur.dedup.decontamination_sets]}


def seed_set_inputs(run: CurationRun) -> dict:
    return {"seeds": [path_fingerprint(p) for p in run.cur.retrieval.seed_sets]}


def path_fingerprint(path: str) -> dict:
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


# ----------------------------------------------------------------------------- embed
def embed_slice(run: CurationRun, i: int, n: int, out: Path) -> dict:
    cur = run.cur.embed
    if run.pool is not None:
        n_items = len(run.pool)
    else:
        n_items = embedding.load_embeddings_file(cur.embeddings_file, None).shape[0]
    rows = embedding.embed_slice_range(n_items, cur.batch_size, i, n)
    embedders = embedding.pool_embedders(cur) if run.pool is not None else {}
    result = embedding.embed_slice(run.pool, rows, embedders, cur.embeddings_file, cur.batch_size, cur.num_workers,
                                   cur.dtype)
    embedding.save_slice(out, result)
    return {"start": rows.start, "items": len(rows), "valid": int(result.arrays["valid"].sum()),
            "skipped": result.skipped}


def embed_merge(run: CurationRun, slices: list[Path]) -> dict:
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


def dedup_stage(run: CurationRun) -> dict:
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


def _first_part(run: CurationRun) -> str:
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
def kmeans_stage(run: CurationRun) -> dict:
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
        a, d = assign_block(block, centroids, 0, hi - lo)
        assignment[lo - rows.start:hi - rows.start], distances[lo - rows.start:hi - rows.start] = a, d
    return assignment, distances


def assign_slice(run: CurationRun, i: int, n: int, out: Path) -> dict:
    candidates = run.candidates()
    rows = block_range(len(candidates), i, n, ASSIGN_BLOCK_ROWS)
    centroids = ClusterTree.load(run.dir("kmeans") / "levels").levels[0].centroids
    assignment, distances = assign_rows(run.embeddings(), candidates, centroids, rows)
    save_npy(out / "assignment.npy", assignment)
    save_npy(out / "distances.npy", distances)
    return {"start": rows.start, "items": len(rows)}


def assign_merge(run: CurationRun, slices: list[Path]) -> dict:
    parts = []
    for directory in slices:
        parts.append((read_marker(directory)["counts"]["start"], np.load(directory / "assignment.npy"),
                      np.load(directory / "distances.npy")))
    n_candidates = len(run.candidates())
    assignment, distances = merge_assignment_slices(parts, n_candidates)
    save_npy(run.dir("assign") / "assignment.npy", assignment)
    save_npy(run.dir("assign") / "distances.npy", distances)
    return {"items": n_candidates, "non_empty_clusters": int(len(np.unique(assignment)))}


# ----------------------------------------------------------------------------- sample (+ retrieval)
def sample_stage(run: CurationRun) -> dict:
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
def shards_slice(run: CurationRun, i: int, n: int, out: Path) -> dict:
    """Writes its shards straight into the stage folder (`out`, the slice's folder, only gets the marker)."""
    cur = run.cur.shards
    stats = write_shard_slice(run.dir("shards"), run.selection(), run.require_pool("writing shards"),
                              cur.shard_size, cur.image_format, cur.quality, run.cfg.seed, i, n)
    return {"shards": stats}


def shards_merge(run: CurationRun, slices: list[Path]) -> dict:
    stats: dict[str, dict[str, int]] = {}
    for directory in slices:
        stats.update(read_marker(directory)["counts"]["shards"])
    cur = run.cur.shards
    manifest = write_manifest(run.dir("shards"), run.selection(), run.require_pool("writing shards"), stats,
                              cur.shard_size, cur.image_format, config_hash(run.key("shards")))
    return {key: manifest[key] for key in ("n_items", "n_reencoded", "n_unreadable")} | {
        "n_shards": len(manifest["shards"])}


# ----------------------------------------------------------------------------- report
def report_stage(run: CurationRun) -> dict:
    tree, selection = run.tree(), run.selection()
    dedup = load_dedup_result(run.dir("dedup"))
    counts = {name: read_marker(run.dir(name))["counts"] for name in ("embed", "dedup", "sample")}
    with atomic_dir(run.dir("report")) as tmp:
        path = write_curation_report(tmp, run.pool, tree, selection, dedup.groups, run.cur.report_examples, counts)
    return {"report": path.name}
