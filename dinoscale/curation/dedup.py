"""Deduplication and decontamination of an image pool (DINOv2, appendix A).

1. Exact duplicates: items with the same content hash (sha256 of the file bytes).
2. Near duplicates: among the remaining items, a k-NN graph on L2-normalised embeddings
   (k=64) keeps the edges with cosine above a threshold (0.6); the connected components of
   exact and near-duplicate links, found by union-find, keep one survivor each: the most
   pixels when pixel counts are known, then the smallest key.
3. Decontamination: a component with any item closer than a cosine threshold (0.45) to an
   image of a reference (evaluation) set is dropped whole.

The k-NN graph uses an exact faiss index up to `ivf_min_size` items and an inverted file
above; queries run in chunks and their edges are merged into the union-find as they come, so
memory stays at the index plus one chunk.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dinoscale.curation.config import DedupConfig
from dinoscale.curation.faiss_utils import DEFAULT_CHUNK_ROWS, check_embeddings, inner_product_index, search
from dinoscale.errors import DataError
from dinoscale.utils.io import read_json, save_npy, write_json
from dinoscale.utils.logging import get_logger, progress

log = get_logger(__name__)


@dataclass
class DedupResult:
    """Which pool items to keep, the duplicate groups found, and how many were dropped why."""

    keep: np.ndarray  # (N,) bool
    groups: list[np.ndarray]  # components of more than one item; the survivor first, then ascending
    contaminated: np.ndarray  # (N,) bool: items of components that touch a reference set
    counts: dict[str, int]


def content_hashes(read_bytes: Callable[[int], bytes], n_items: int) -> list[str]:
    """sha256 hex digest of the bytes of each item 0..n_items-1."""
    return [hashlib.sha256(read_bytes(i)).hexdigest() for i in progress(range(n_items), "hashing", n_items)]


def deduplicate(embeddings: np.ndarray, cfg: DedupConfig, hashes: Sequence[str] | Callable[[int], bytes] | None = None,
                pixel_counts: np.ndarray | None = None, keys: Sequence[str] | None = None,
                reference_sets: Sequence[np.ndarray] = (), seed: int = 0) -> DedupResult:
    """Deduplicate the pool whose row i of `embeddings` (N, D) is item i.

    `cfg` is a `DedupConfig`. `hashes` are per-item content digests, or a function returning
    item i's bytes (hashed here); without them (or with `cfg.exact` false) only near duplicates
    are removed. `pixel_counts` and `keys` decide the survivor of each group (largest image,
    then smallest key; the smallest index without keys). `reference_sets` are embeddings of
    evaluation images to decontaminate against.
    """
    check_embeddings(embeddings, "embeddings")
    for i, reference in enumerate(reference_sets):
        check_embeddings(reference, f"decontamination set {i}")
        if reference.shape[1] != embeddings.shape[1]:
            raise DataError(f"decontamination set {i} has {reference.shape[1]}-d embeddings but the pool has "
                            f"{embeddings.shape[1]}-d; embed it with the same backbone")
    n = embeddings.shape[0]
    rank = _survivor_rank(n, pixel_counts, keys)
    parent = np.arange(n)

    representatives = np.arange(n)
    if cfg.exact and hashes is not None:
        digests = content_hashes(hashes, n) if callable(hashes) else hashes
        if len(digests) != n:
            raise DataError(f"got {len(digests)} content hashes for {n} embeddings; give one per pool item")
        representatives = _union_exact_duplicates(parent, np.asarray(digests), rank)
    n_exact = n - len(representatives)

    for u, v in _near_duplicate_edges(embeddings, representatives, cfg, seed):
        _union(parent, u, v)
    labels = _find(parent, np.arange(n))
    n_components = len(np.unique(labels))

    survivors = _survivors(labels, rank)
    contaminated = np.zeros(n, dtype=bool)
    for reference in reference_sets:
        touching = _close_to_reference(embeddings, representatives, reference, cfg, seed)
        contaminated |= np.isin(labels, labels[representatives[touching]])
    keep = np.zeros(n, dtype=bool)
    keep[survivors] = True
    keep &= ~contaminated

    groups = _groups(labels, rank)
    counts = {
        "items": n,
        "exact_duplicates": n_exact,
        "near_duplicates": len(representatives) - n_components,
        "duplicate_groups": len(groups),
        "contaminated_items": int(contaminated.sum()),
        "contaminated_removed": int(contaminated[survivors].sum()),
        "kept": int(keep.sum()),
    }
    log.info("dedup: %s", counts)
    return DedupResult(keep, groups, contaminated, counts)


def save_dedup_result(result: DedupResult, directory: str | Path) -> None:
    """Write keep.npy, contaminated.npy, the groups (CSR: group_members.npy + group_offsets.npy), counts.json."""
    directory = Path(directory)
    save_npy(directory / "keep.npy", result.keep)
    save_npy(directory / "contaminated.npy", result.contaminated)
    members = np.concatenate(result.groups) if result.groups else np.zeros(0, dtype=np.int64)
    save_npy(directory / "group_members.npy", members.astype(np.int64))
    save_npy(directory / "group_offsets.npy", np.cumsum([0] + [len(g) for g in result.groups]).astype(np.int64))
    write_json(directory / "counts.json", result.counts)


def load_dedup_result(directory: str | Path) -> DedupResult:
    directory = Path(directory)
    if not (directory / "counts.json").exists():
        raise DataError(f"no dedup result in '{directory}' (counts.json missing); run the dedup stage first")
    members, offsets = np.load(directory / "group_members.npy"), np.load(directory / "group_offsets.npy")
    groups = [members[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    return DedupResult(np.load(directory / "keep.npy"), groups, np.load(directory / "contaminated.npy"),
                       read_json(directory / "counts.json"))


# ----------------------------------------------------------------------------- graph building
def _near_duplicate_edges(x: np.ndarray, rows: np.ndarray, cfg: DedupConfig, seed: int):
    """Yield (u, v) arrays of pool indices whose cosine exceeds cfg.threshold among the k nearest."""
    index = inner_product_index(x, cfg.ivf_min_size, cfg.nprobe, rows=rows, seed=seed)
    for pos, scores, ids in progress(search(index, x, cfg.k + 1, rows=rows), "near-duplicate graph",
                                     total=-(-len(rows) // DEFAULT_CHUNK_ROWS)):
        query = np.arange(pos, pos + len(ids))[:, None]
        linked = (scores > cfg.threshold) & (ids >= 0) & (ids != query)
        q, j = np.nonzero(linked)
        yield rows[pos + q], rows[ids[q, j]]


def _close_to_reference(x: np.ndarray, rows: np.ndarray, reference: np.ndarray, cfg: DedupConfig, seed: int) -> np.ndarray:
    """Positions within `rows` whose nearest reference image has cosine above the threshold."""
    index = inner_product_index(reference, cfg.ivf_min_size, cfg.nprobe, seed=seed)
    hits = [pos + np.flatnonzero(scores[:, 0] > cfg.decontamination_threshold)
            for pos, scores, _ in search(index, x, 1, rows=rows)]
    return np.concatenate(hits)


# ----------------------------------------------------------------------------- union-find
def _find(parent: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Roots of `nodes`, compressing their paths."""
    roots = parent[nodes]
    while True:
        up = parent[roots]
        if np.array_equal(up, roots):
            break
        roots = up
    parent[nodes] = roots
    return roots


def _union(parent: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    """Merge the sets of u[i] and v[i] for all i; the root of a set is its smallest member."""
    while len(u):
        ru, rv = _find(parent, u), _find(parent, v)
        differ = ru != rv
        u, v, ru, rv = u[differ], v[differ], ru[differ], rv[differ]
        # each root hooks under the smallest root it meets this round; the rest waits a round
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))


def _union_exact_duplicates(parent: np.ndarray, digests: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Link items of equal digest to the best-ranked one among them; return those representatives."""
    _, group = np.unique(digests, return_inverse=True)
    order = np.lexsort((rank, group))
    first = np.r_[True, group[order][1:] != group[order][:-1]]
    representative = np.repeat(order[first], np.diff(np.r_[np.flatnonzero(first), len(order)]))
    _union(parent, order, representative)
    return np.sort(order[first])


# ----------------------------------------------------------------------------- survivors
def _survivor_rank(n: int, pixel_counts: np.ndarray | None, keys: Sequence[str] | None) -> np.ndarray:
    """Rank of each item as a survivor, 0 best: most pixels first, then smallest key (or index)."""
    for name, values in (("pixel_counts", pixel_counts), ("keys", keys)):
        if values is not None and len(values) != n:
            raise DataError(f"got {len(values)} {name} for {n} embeddings; give one per pool item")
    key_order = np.argsort(np.asarray(keys), kind="stable") if keys is not None else np.arange(n)
    key_rank = np.empty(n, dtype=np.int64)
    key_rank[key_order] = np.arange(n)
    pixels = np.zeros(n) if pixel_counts is None else np.asarray(pixel_counts, dtype=np.float64)
    rank = np.empty(n, dtype=np.int64)
    rank[np.lexsort((key_rank, -pixels))] = np.arange(n)
    return rank


def _survivors(labels: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """The best-ranked item of each component."""
    order = np.lexsort((rank, labels))
    first = np.r_[True, labels[order][1:] != labels[order][:-1]]
    return order[first]


def _groups(labels: np.ndarray, rank: np.ndarray) -> list[np.ndarray]:
    """Components of more than one item, each listed survivor first, then by ascending index."""
    sizes = np.bincount(labels)
    members = np.flatnonzero(sizes[labels] > 1)
    if len(members) == 0:
        return []
    order = members[np.lexsort((members, labels[members]))]
    starts = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]])
    groups = []
    for group in np.split(order, starts[1:]):
        best = group[np.argmin(rank[group])]
        groups.append(np.r_[best, group[group != best]])
    return groups
