"""Deduplication and decontamination of an image pool (DINOv2, appendix A).

1. Exact duplicates: items with the same content hash (sha256 of the file bytes).
2. Near duplicates: among the remaining items, a k-NN graph on L2-normalised embeddings
   (k=64) keeps the edges with cosine above a threshold (0.6).
3. Groups: `group_duplicates` turns the exact and near links into duplicate groups with one
   survivor each: the most pixels when pixel counts are known, then the smallest key.
4. Decontamination: a group (or single item) with any item closer than a cosine threshold (0.45)
   to an image of a reference (evaluation) set is dropped whole, in the same pass.

The work is shared out over the ranks of a process group (a single process is a world of one):
each rank owns contiguous blocks of items (`collective`). Exact duplicates are found by hash
partitioning: each item's digest travels to the rank its digest hashes to, which picks each
digest's survivor. The k-NN graph is searched across shards (`knn.ShardedCosineIndex`: each rank
indexes its own items, every rank's queries visit every shard; exact faiss index up to
`ivf_min_size` items, an inverted file above), and a pair's side of the threshold is decided in
float64 wherever faiss's score could be off. The links (a few per cent of the pool) are
gathered on every rank and grouped there by the same rule, in a fixed order, so the groups and
the kept set are those of a single process.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from dinoscale.curation.collective import Comm
from dinoscale.curation.faiss_utils import check_embeddings
from dinoscale.curation.knn import Neighbours, ShardedCosineIndex
from dinoscale.curation.store import data_fingerprint
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


def content_hashes(read_bytes: Callable[[int], bytes], n_items: int, rows: range | None = None) -> list[str]:
    """sha256 hex digest of the bytes of each item 0..n_items-1 (or of `rows` only)."""
    rows = range(n_items) if rows is None else rows
    return [hashlib.sha256(read_bytes(i)).hexdigest() for i in progress(rows, "hashing", len(rows))]


def deduplicate(embeddings: Any, cfg: Any, hashes: Sequence[str] | Callable[[int], bytes] | None = None,
                pixel_counts: Any = None, keys: Sequence[str] | None = None,
                reference_sets: Sequence[np.ndarray] = (), seed: int = 0) -> DedupResult:
    """Deduplicate the pool whose row i of `embeddings` (N, D; a memory map or row store is read
    block by block) is item i, on every rank of the process group; every rank returns the result.

    `cfg` is a `DedupConfig`. `hashes` are per-item content digests, or a function returning
    item i's bytes (hashed here, each rank its own items); without them (or with `cfg.exact`
    false) only near duplicates are removed. `pixel_counts` and `keys` decide the survivor of
    each group (largest image, then smallest key; the smallest index without keys).
    `reference_sets` are embeddings of evaluation images to decontaminate against.
    """
    check_embeddings(embeddings, "embeddings")
    for i, reference in enumerate(reference_sets):
        check_embeddings(reference, f"decontamination set {i}")
        if reference.shape[1] != embeddings.shape[1]:
            raise DataError(f"decontamination set {i} has {reference.shape[1]}-d embeddings but the pool has "
                            f"{embeddings.shape[1]}-d; embed it with the same backbone")
    n = embeddings.shape[0]
    if hashes is not None and not callable(hashes) and len(hashes) != n:
        raise DataError(f"got {len(hashes)} content hashes for {n} embeddings; give one per pool item")
    priority = SurvivorPriority(n, pixel_counts, keys)
    comm = Comm.current()
    comm.check_same({"rows": n, "dim": embeddings.shape[1], "data": data_fingerprint(embeddings), "seed": seed,
                     "config": {k: getattr(cfg, k) for k in ("exact", "k", "threshold", "decontamination_threshold",
                                                             "ivf_min_size", "nprobe")},
                     "references": [data_fingerprint(r) for r in reference_sets]}, "dedup input",
                    "every rank must read the same embeddings, from a file system they all share, with the same config")
    rows = comm.rows(n)

    exact_links = np.zeros((0, 2), dtype=np.int64)
    if cfg.exact and hashes is not None:
        exact_links = _exact_duplicate_links(hashes, rows, priority, comm)
    duplicates_here = exact_links[(exact_links[:, 0] >= rows.start) & (exact_links[:, 0] < rows.stop), 0]
    representatives = np.setdiff1d(np.arange(rows.start, rows.stop), duplicates_here)

    index = ShardedCosineIndex(embeddings, representatives, comm, cfg.ivf_min_size, cfg.nprobe, seed)
    near_links, truncated = _near_duplicate_links(index, embeddings, representatives, cfg)
    groups = group_duplicates(exact_links, near_links, priority)

    touching = np.zeros(0, dtype=np.int64)
    for reference in reference_sets:
        touching = np.union1d(touching, _close_to_reference(embeddings, representatives, reference, cfg, seed))
    touching = comm.concat(touching)
    group_of = _group_of(groups)
    contaminated = np.zeros(n, dtype=bool)
    contaminated[touching] = True
    for g in np.unique([group_of[i] for i in touching.tolist() if i in group_of]).astype(np.int64):
        contaminated[groups[g]] = True

    keep = np.ones(n, dtype=bool)
    for group in groups:
        keep[group[1:]] = False
    survivors_contaminated = int((contaminated & keep).sum())
    keep &= ~contaminated
    n_removed = sum(len(g) - 1 for g in groups)
    counts = {
        "items": n,
        "exact_duplicates": len(exact_links),
        "near_duplicates": n_removed - len(exact_links),
        "duplicate_groups": len(groups),
        "contaminated_items": int(contaminated.sum()),
        "contaminated_removed": survivors_contaminated,
        "kept": int(keep.sum()),
    }
    if truncated and comm.is_main:
        log.warning("dedup: %d items have all of their %d nearest neighbours above the threshold, so more of their "
                    "duplicates may lie beyond them; raise curation.dedup.k", truncated, cfg.k)
    log.info("dedup: %s", counts)
    return DedupResult(keep, groups, contaminated, counts)


class SurvivorPriority:
    """Which item of a group survives: the most pixels when pixel counts are known, then the smallest
    key (the smallest index without keys)."""

    def __init__(self, n: int, pixel_counts: Any, keys: Sequence[str] | None):
        for name, values in (("pixel_counts", pixel_counts), ("keys", keys)):
            if values is not None and len(values) != n:
                raise DataError(f"got {len(values)} {name} for {n} embeddings; give one per pool item")
        self.pixel_counts, self.keys = pixel_counts, keys

    def order(self, items: np.ndarray) -> np.ndarray:
        """`items` sorted best survivor first."""
        items = np.asarray(items, dtype=np.int64)
        pixels = np.zeros(len(items)) if self.pixel_counts is None else \
            -np.asarray(self.pixel_counts[items], dtype=np.float64)
        keys = items if self.keys is None else np.array([self.keys[i] for i in items.tolist()])
        return items[np.lexsort((items, keys, pixels))]


def group_duplicates(exact_links: np.ndarray, near_links: np.ndarray, priority: SurvivorPriority
                     ) -> list[np.ndarray]:
    """The duplicate groups of more than one item, from (item, item) links: the connected components
    of all links. Each group is listed survivor first, then ascending; groups by their smallest item."""
    links = np.concatenate([exact_links, near_links]).astype(np.int64)
    if len(links) == 0:
        return []
    nodes, compact = np.unique(links, return_inverse=True)
    compact = compact.reshape(-1, 2)
    parent = np.arange(len(nodes))
    _union(parent, compact[:, 0], compact[:, 1])
    roots = _find(parent, np.arange(len(nodes)))
    order = np.lexsort((nodes, roots))
    starts = np.flatnonzero(np.r_[True, roots[order][1:] != roots[order][:-1]])
    groups = []
    for members in np.split(nodes[order], starts[1:]):
        best = priority.order(members)[0]
        groups.append(np.r_[best, members[members != best]])
    return sorted(groups, key=lambda g: int(g.min()))


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


# ----------------------------------------------------------------------------- exact and near links
def _exact_duplicate_links(hashes: Sequence[str] | Callable[[int], bytes], rows: range, priority: SurvivorPriority,
                           comm: Comm) -> np.ndarray:
    """(duplicate, survivor) pairs of all items with the same digest, on every rank. Each rank hashes
    its own items and sends each digest to the rank the digest's crc32 names; that rank groups them."""
    if callable(hashes):
        digests = content_hashes(hashes, 0, rows)
    else:
        digests = [h.decode() if isinstance(h, bytes) else str(h) for h in np.asarray(hashes[rows.start:rows.stop])]
    encoded = np.array([d.encode() for d in digests], dtype=f"S{max([1, *map(len, digests)])}")
    width = int(comm.max(np.array([encoded.dtype.itemsize]))[0])
    encoded = encoded.astype(f"S{width}")
    bucket = np.array([zlib.crc32(d) % comm.world for d in encoded], dtype=np.int64)
    order = np.argsort(bucket, kind="stable")
    cuts = np.searchsorted(bucket[order], np.arange(1, comm.world))
    items = np.arange(rows.start, rows.stop, dtype=np.int64)[order]
    received = np.concatenate(comm.exchange(np.split(encoded[order], cuts)))
    received_items = np.concatenate(comm.exchange(np.split(items, cuts)))
    _, digest_group = np.unique(received, return_inverse=True)
    by_group = np.lexsort((received_items, digest_group))
    starts = np.flatnonzero(np.r_[True, np.diff(digest_group[by_group]) != 0])
    links = []
    for members in np.split(received_items[by_group], starts[1:]):
        if len(members) > 1:
            best = priority.order(members)[0]
            links.append(np.stack([members[members != best], np.full(len(members) - 1, best)], axis=1))
    local = np.concatenate([np.zeros((0, 2), dtype=np.int64), *links])
    gathered = comm.concat(local)
    return gathered[np.argsort(gathered[:, 0], kind="stable")]


def _near_duplicate_links(index: ShardedCosineIndex, x: Any, representatives: np.ndarray, cfg: Any
                          ) -> tuple[np.ndarray, int]:
    """(item, neighbour) pairs among the k nearest of each representative with cosine above the
    threshold, from all ranks, sorted; and how many items had all k neighbours above it."""
    links, truncated = [], [0]

    def collect(query_ids: np.ndarray, found: Neighbours) -> None:
        linked = found.above & (found.ids != query_ids[:, None])
        q, j = np.nonzero(linked)
        links.append(np.stack([query_ids[q], found.ids[q, j]], axis=1))
        truncated[0] += int(found.above[:, -1].sum())

    index.search(x, representatives, cfg.k + 1, cfg.threshold, collect)
    gathered = index.comm.concat(np.concatenate([np.zeros((0, 2), dtype=np.int64), *links]))
    return gathered[np.lexsort((gathered[:, 1], gathered[:, 0]))], int(index.comm.sum(np.array(truncated))[0])


def _close_to_reference(x: Any, representatives: np.ndarray, reference: np.ndarray, cfg: Any, seed: int
                        ) -> np.ndarray:
    """This rank's representatives whose nearest reference image has cosine above the threshold."""
    index = ShardedCosineIndex(reference, np.arange(len(reference)), Comm(), cfg.ivf_min_size, cfg.nprobe, seed)
    hits = []
    index.search(x, representatives, 1, cfg.decontamination_threshold,
                 lambda query_ids, found: hits.append(query_ids[found.above[:, 0]]))
    return np.concatenate([np.zeros(0, dtype=np.int64), *hits])


def _group_of(groups: list[np.ndarray]) -> dict[int, int]:
    return {int(i): g for g, members in enumerate(groups) for i in members.tolist()}


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
