"""Deduplication and decontamination of an image pool (DINOv2, appendix A), without chaining.

1. Exact duplicates: items with the same content hash (sha256 of the file bytes) form one set whose
   representative is its best-ranked item (rank below).
2. Near duplicates: among the representatives, a k-NN graph on L2-normalised embeddings keeps the
   edges whose cosine exceeds `threshold` (u-v is an edge when v is among u's k nearest or u among
   v's: the graph is symmetric).
3. Groups, the rule (deterministic, and independent of the order of the pool):
   - rank: items are ordered by most pixels first, then smallest key (smallest index without keys);
     this order is a property of the images, not of where they sit in the pool.
   - survivors: walk the representatives from the best rank down; one that is not yet in a group
     starts a group as its survivor and takes every representative linked to it by an edge that is
     not yet in a group. Equivalently, a representative is a survivor if and only if none of its
     better-ranked neighbours is a survivor (the lexicographically first maximal independent set of
     the graph in rank order), and every other representative joins its best-ranked neighbouring
     survivor, which always ranks above it.
   - exact duplicates follow their representative into its group.
   So every member of a group is a near duplicate of the group's survivor itself (cosine above the
   threshold, or an exact copy of an image that is): a chain a~b~c of look-alikes with a and c far
   apart never ends in one group, as it does with connected components (which on 1,848 real
   drawings merged groups of 147 different pictures). Two survivors are never linked, so the kept
   images are pairwise below the threshold among their k nearest.
   `survivor_states` computes the survivors in rounds over the edge list (each round decides
   every representative whose better-ranked neighbours are all decided); the result is the walk's,
   whatever the number of rounds, and needs only the edges and the ranks of their ends.
4. Decontamination: a group (or lone image) with any member closer than `decontamination_threshold`
   to an image of a reference (evaluation) set is dropped whole.

The threshold is the embedding's: `copy_descriptor.CALIBRATIONS` holds each model-free descriptor's
calibrated default and working range, measured on the real-image set (`dinoscale.data.real_images`);
`check_threshold` refuses a threshold below a descriptor's working range (it merges different
pictures) and warns above it (it misses copies).

The work is shared out over the ranks of a process group (a single process is a world of one):
each rank owns contiguous blocks of items (`collective`). Exact duplicates are found by hash
partitioning: each item's digest travels to the rank its digest hashes to, which picks each
digest's representative. The k-NN graph is searched across shards (`knn.ShardedCosineIndex`: each
rank indexes its own items, every rank's queries visit every shard; exact faiss index up to
`ivf_min_size` items, an inverted file above), and a pair's side of the threshold and its place
among a query's k nearest are decided on its float64 cosine wherever faiss's score could be off
(the grouping depends on exactly which neighbours above the threshold are among the k nearest).
Exact search makes the edge set independent of the pool order up to ties in the k-th neighbour's
score. The links (a few per cent of the pool) are
gathered on every rank, and every rank groups them by the rule above, ranking only the items the
links name (by their pixel counts and keys, which every rank reads from the same store), so the
groups and the kept set are those of a single process.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from dinoscale.curation.collective import Comm
from dinoscale.curation.config import DedupConfig
from dinoscale.curation.faiss_utils import check_embeddings
from dinoscale.curation.knn import Neighbours, ShardedCosineIndex
from dinoscale.curation.store import data_fingerprint, fingerprint_rows
from dinoscale.errors import ConfigError, DataError
from dinoscale.utils.io import read_json, save_npy, write_json
from dinoscale.utils.logging import get_logger, progress

log = get_logger(__name__)


@dataclass
class DedupResult:
    """Which pool items to keep, the duplicate groups found, and how many were dropped why."""

    keep: np.ndarray  # (N,) bool
    groups: list[np.ndarray]  # groups of more than one item; the survivor first, then ascending
    contaminated: np.ndarray  # (N,) bool: items of groups that touch a reference set
    counts: dict[str, int]


def content_hashes(read_bytes: Callable[[int], bytes], n_items: int, rows: range | None = None) -> list[str]:
    """sha256 hex digest of the bytes of each item 0..n_items-1 (or of `rows` only)."""
    rows = range(n_items) if rows is None else rows
    return [hashlib.sha256(read_bytes(i)).hexdigest() for i in progress(rows, "hashing", len(rows))]


def deduplicate(embeddings: Any, cfg: DedupConfig, hashes: Sequence[str] | Callable[[int], bytes] | None = None,
                pixel_counts: Any = None, keys: Sequence[str] | None = None,
                reference_sets: Sequence[np.ndarray] = (), seed: int = 0) -> DedupResult:
    """Deduplicate the pool whose row i of `embeddings` (N, D; a memory map or row store is read
    block by block) is item i, on every rank of the process group; every rank returns the result.

    `hashes` are per-item content digests, or a function returning
    item i's bytes (hashed here, each rank its own items); without them (or with `cfg.exact`
    false) only near duplicates are removed. `pixel_counts` and `keys` rank the items (largest
    image, then smallest key; the smallest index without keys). `reference_sets` are embeddings
    of evaluation images to decontaminate against.
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
                     "rank": priority.fingerprint(),
                     "config": {k: getattr(cfg, k) for k in ("exact", "k", "threshold", "decontamination_threshold",
                                                             "ivf_min_size", "nprobe")},
                     "references": [data_fingerprint(r) for r in reference_sets]}, "dedup input",
                    "every rank must read the same embeddings, pixel counts and keys, from a file system they all "
                    "share, with the same config")
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
        "largest_group": max((len(g) for g in groups), default=1),
        "contaminated_items": int(contaminated.sum()),
        "contaminated_removed": survivors_contaminated,
        "kept": int(keep.sum()),
    }
    if truncated and comm.is_main:
        log.warning("dedup: %d items have all of their %d nearest neighbours above the threshold, so more of their "
                    "duplicates may lie beyond them; raise curation.dedup.k", truncated, cfg.k)
    log.info("dedup: %s", counts)
    return DedupResult(keep, groups, contaminated, counts)


def check_threshold(embedding: str, threshold: float, key: str = "curation.dedup.threshold") -> None:
    """Refuse a near-dedup threshold far below the model-free `embedding`'s working range and warn outside
    it, with the precision and recall measured there on real images (models a user gives are not checked)."""
    # imported here: the descriptors pull in torchvision (170 MB per process) that deduplicate never needs
    from dinoscale.curation.copy_descriptor import CALIBRATIONS

    calibration = CALIBRATIONS.get(embedding)
    if calibration is None:
        return
    precision, recall = calibration.at(threshold)
    low, high = calibration.working_range
    measured = (f"on real images the `{embedding}` embedding measured pairwise precision {precision:.2f} and recall "
                f"{recall:.2f} near cosine {threshold}")
    if threshold < calibration.refuse_below:
        raise ConfigError(f"{key} = {threshold} is below {calibration.refuse_below}, where {measured}: most images "
                          f"it removes would not be copies. Use {low}-{high}, or a copy-detection model "
                          "(curation.embed.copy_detection=path/to/model)")
    if not low <= threshold <= high:
        side = "merges different pictures" if threshold < low else "misses most copies"
        log.warning("%s = %s is outside the working range %s-%s of `%s` and %s: %s", key, threshold, low, high,
                    embedding, side, measured)


class SurvivorPriority:
    """The rank of items as survivors: the most pixels when pixel counts are known, then the smallest
    key (the smallest index without keys). Reads the pixel counts and keys of the items it is asked
    about only, so they may stay on disk."""

    def __init__(self, n: int, pixel_counts: Any, keys: Sequence[str] | None):
        for name, values in (("pixel_counts", pixel_counts), ("keys", keys)):
            if values is not None and len(values) != n:
                raise DataError(f"got {len(values)} {name} for {n} embeddings; give one per pool item")
        self.n, self.pixel_counts, self.keys = n, pixel_counts, keys

    def order(self, items: np.ndarray) -> np.ndarray:
        """`items` sorted best survivor first."""
        items = np.asarray(items, dtype=np.int64)
        pixels = np.zeros(len(items)) if self.pixel_counts is None else \
            -np.asarray(self.pixel_counts[items], dtype=np.float64)
        keys = items if self.keys is None else np.array([self.keys[i] for i in items.tolist()])
        return items[np.lexsort((items, keys, pixels))]

    def fingerprint(self) -> list[str | None]:
        """Of the pixel counts and of up to 64 evenly spaced keys, for ranks to compare."""
        pixels = None if self.pixel_counts is None else data_fingerprint(self.pixel_counts)
        if self.keys is None:
            return [pixels, None]
        sampled = "\n".join(str(self.keys[i]) for i in fingerprint_rows(self.n).tolist())
        return [pixels, hashlib.sha256(f"{self.n}\n{sampled}".encode()).hexdigest()[:16]]


def group_duplicates(exact_links: np.ndarray, near_links: np.ndarray, priority: SurvivorPriority
                     ) -> list[np.ndarray]:
    """The duplicate groups of more than one item by the rule of the module docstring, from the
    (duplicate, representative) exact links and the (item, item) near links among representatives.
    Each group is listed survivor first, then ascending; groups in ascending order of their survivor."""
    near_links = np.asarray(near_links, dtype=np.int64).reshape(-1, 2)
    exact_links = np.asarray(exact_links, dtype=np.int64).reshape(-1, 2)
    nodes = np.unique(np.concatenate([near_links.ravel(), exact_links[:, 1]]))
    rank = np.empty(len(nodes), dtype=np.int64)
    rank[np.searchsorted(nodes, priority.order(nodes))] = np.arange(len(nodes))
    compact = np.searchsorted(nodes, near_links)
    survivor = nodes[survivor_of(compact[:, 0], compact[:, 1], rank)]
    items = np.concatenate([nodes, exact_links[:, 0]])  # exact duplicates follow their representative
    return _groups(items, np.concatenate([survivor, survivor[np.searchsorted(nodes, exact_links[:, 1])]]))


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
    its own items and sends each digest to the rank its bytes name (`_owner_ranks`); that rank groups
    them. Digests stay in numpy arrays: millions of Python strings per rank would cost gigabytes."""
    digests = _as_bytes(content_hashes(hashes, 0, rows) if callable(hashes) else hashes[rows.start:rows.stop])
    width = int(comm.max(np.array([max(digests.dtype.itemsize, 1)]))[0])
    digests = digests.astype(f"S{width}")
    owner = _owner_ranks(digests, comm.world)
    order = np.argsort(owner, kind="stable")
    cuts = np.searchsorted(owner[order], np.arange(1, comm.world))
    items = np.arange(rows.start, rows.stop, dtype=np.int64)[order]
    received = np.concatenate(comm.exchange(np.split(digests[order], cuts)))
    received_items = np.concatenate(comm.exchange(np.split(items, cuts)))
    _, digest_group, sizes = np.unique(received, return_inverse=True, return_counts=True)
    shared = sizes[digest_group.reshape(-1)] > 1
    members, groups = received_items[shared], digest_group.reshape(-1)[shared]
    by_group = np.lexsort((members, groups))
    starts = np.flatnonzero(np.diff(groups[by_group])) + 1
    links = [np.zeros((0, 2), dtype=np.int64)]
    for group in np.split(members[by_group], starts) if len(members) else []:
        best = priority.order(group)[0]
        links.append(np.stack([group[group != best], np.full(len(group) - 1, best)], axis=1))
    gathered = comm.concat(np.concatenate(links))
    return gathered[np.argsort(gathered[:, 0], kind="stable")]


def _as_bytes(digests: Any) -> np.ndarray:
    """Digests (bytes, or text taken as UTF-8) as a numpy bytes array."""
    digests = np.asarray(digests)
    if digests.dtype.kind == "S":
        return digests
    if digests.dtype.kind == "U":
        return np.char.encode(digests, "utf-8")
    return np.array([d if isinstance(d, bytes) else str(d).encode() for d in digests.tolist()], dtype=bytes)


def _owner_ranks(digests: np.ndarray, world: int) -> np.ndarray:
    """The rank that groups each digest: the FNV-1a hash of its bytes (zero-padded to the width every
    rank uses) modulo the world size."""
    columns = digests.view(np.uint8).reshape(len(digests), digests.dtype.itemsize)
    h = np.full(len(digests), 0xCBF29CE484222325, dtype=np.uint64)
    for column in columns.T:
        h = (h ^ column) * np.uint64(0x100000001B3)  # wraps modulo 2^64, as FNV-1a does
    return (h % np.uint64(world)).astype(np.int64)


def _near_duplicate_links(index: ShardedCosineIndex, x: Any, representatives: np.ndarray, cfg: DedupConfig
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


def _close_to_reference(x: Any, representatives: np.ndarray, reference: np.ndarray, cfg: DedupConfig, seed: int
                        ) -> np.ndarray:
    """This rank's representatives whose nearest reference image has cosine above the threshold."""
    index = ShardedCosineIndex(reference, np.arange(len(reference)), Comm(), cfg.ivf_min_size, cfg.nprobe, seed)
    hits = []
    index.search(x, representatives, 1, cfg.decontamination_threshold,
                 lambda query_ids, found: hits.append(query_ids[found.above[:, 0]]))
    return np.concatenate([np.zeros(0, dtype=np.int64), *hits])


def _group_of(groups: list[np.ndarray]) -> dict[int, int]:
    return {int(i): g for g, members in enumerate(groups) for i in members.tolist()}


# ----------------------------------------------------------------------------- grouping
SURVIVOR, MEMBER, UNDECIDED = 1, 2, 0


def survivor_states(better: np.ndarray, worse: np.ndarray, n: int) -> np.ndarray:
    """(n,) SURVIVOR or MEMBER of each node of the graph whose edges run from the better-ranked end
    `better[e]` to the worse-ranked `worse[e]`: a node is a survivor iff none of its better-ranked
    neighbours is one (nodes without edges are survivors). Decided in rounds: a node with a
    survivor above it is a member; a node whose better-ranked neighbours are all members is a survivor.
    The best-ranked undecided node is decided in every round, so the loop ends."""
    state = np.full(n, UNDECIDED, dtype=np.int8)
    while True:
        undecided = state == UNDECIDED
        if not undecided.any():
            return state
        below_survivor = np.zeros(n, dtype=bool)
        below_survivor[worse[state[better] == SURVIVOR]] = True
        state[undecided & below_survivor] = MEMBER
        waiting = np.zeros(n, dtype=bool)
        waiting[worse[state[better] != MEMBER]] = True
        state[(state == UNDECIDED) & ~waiting] = SURVIVOR


def survivor_of(u: np.ndarray, v: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """(n,) the survivor of each of n items (itself for survivors and items without edges), for the
    undirected edges u[e]-v[e] and the survivor rank `rank`, a permutation of 0..n-1 (0 best)."""
    n = len(rank)
    better = np.where(rank[u] < rank[v], u, v)
    worse = np.where(rank[u] < rank[v], v, u)
    state = survivor_states(better, worse, n)
    survivor = np.arange(n)
    taken = state[better] == SURVIVOR
    best_rank = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(best_rank, worse[taken], rank[better[taken]])
    members = np.flatnonzero(state == MEMBER)
    by_rank = np.empty(n, dtype=np.int64)
    by_rank[rank] = np.arange(n)
    survivor[members] = by_rank[best_rank[members]]
    return survivor


def _groups(items: np.ndarray, survivor: np.ndarray) -> list[np.ndarray]:
    """Groups of more than one item, from each item's survivor (a survivor is its own): each listed
    survivor first, then by ascending index; groups in ascending order of their survivor."""
    order = np.lexsort((items, items != survivor, survivor))
    items, survivor = items[order], survivor[order]
    starts = np.flatnonzero(np.r_[True, survivor[1:] != survivor[:-1]])
    return [group for group in np.split(items, starts[1:]) if len(group) > 1]
