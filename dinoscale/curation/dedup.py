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

The k-NN graph uses an exact faiss index up to `ivf_min_size` items and an inverted file above;
queries run in chunks and only their edges above the threshold are kept. Exact search makes the
edge set independent of the pool order up to ties in the k-th neighbour's score.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from dinoscale.curation.copy_descriptor import CALIBRATIONS
from dinoscale.curation.faiss_utils import DEFAULT_CHUNK_ROWS, check_embeddings, inner_product_index, search
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


def content_hashes(read_bytes: Callable[[int], bytes], n_items: int) -> list[str]:
    """sha256 hex digest of the bytes of each item 0..n_items-1."""
    return [hashlib.sha256(read_bytes(i)).hexdigest() for i in progress(range(n_items), "hashing", n_items)]


def deduplicate(embeddings: np.ndarray, cfg: Any, hashes: Sequence[str] | Callable[[int], bytes] | None = None,
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
    representative = np.arange(n)  # of each item's exact-duplicate set
    if cfg.exact and hashes is not None:
        digests = content_hashes(hashes, n) if callable(hashes) else hashes
        if len(digests) != n:
            raise DataError(f"got {len(digests)} content hashes for {n} embeddings; give one per pool item")
        representative = _exact_representatives(np.asarray(digests), rank)
    representatives = np.flatnonzero(representative == np.arange(n))

    edges = [np.stack(pair) for pair in _near_duplicate_edges(embeddings, representatives, cfg, seed)]
    u, v = np.concatenate(edges, axis=1) if edges else np.zeros((2, 0), dtype=np.int64)
    survivor = survivor_of(u, v, rank)[representative]

    contaminated = np.zeros(n, dtype=bool)
    for reference in reference_sets:
        touching = _close_to_reference(embeddings, representatives, reference, cfg, seed)
        contaminated |= np.isin(survivor, survivor[representatives[touching]])
    is_survivor = survivor == np.arange(n)
    keep = is_survivor & ~contaminated

    groups = _groups(survivor)
    counts = {
        "items": n,
        "exact_duplicates": n - len(representatives),
        "near_duplicates": int((~is_survivor[representatives]).sum()),
        "duplicate_groups": len(groups),
        "largest_group": max((len(g) for g in groups), default=1),
        "contaminated_items": int(contaminated.sum()),
        "contaminated_removed": int(contaminated[is_survivor].sum()),
        "kept": int(keep.sum()),
    }
    log.info("dedup: %s", counts)
    return DedupResult(keep, groups, contaminated, counts)


def check_threshold(embedding: str, threshold: float, key: str = "curation.dedup.threshold") -> None:
    """Refuse a near-dedup threshold far below the model-free `embedding`'s working range and warn outside
    it, with the precision and recall measured there on real images (models a user gives are not checked)."""
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
def _near_duplicate_edges(x: np.ndarray, rows: np.ndarray, cfg: Any, seed: int):
    """Yield (u, v) arrays of pool indices whose cosine exceeds cfg.threshold among the k nearest."""
    index = inner_product_index(x, cfg.ivf_min_size, cfg.nprobe, rows=rows, seed=seed)
    for pos, scores, ids in progress(search(index, x, cfg.k + 1, rows=rows), "near-duplicate graph",
                                     total=-(-len(rows) // DEFAULT_CHUNK_ROWS)):
        query = np.arange(pos, pos + len(ids))[:, None]
        linked = (scores > cfg.threshold) & (ids >= 0) & (ids != query)
        q, j = np.nonzero(linked)
        yield rows[pos + q], rows[ids[q, j]]


def _close_to_reference(x: np.ndarray, rows: np.ndarray, reference: np.ndarray, cfg: Any, seed: int) -> np.ndarray:
    """Positions within `rows` whose nearest reference image has cosine above the threshold."""
    index = inner_product_index(reference, cfg.ivf_min_size, cfg.nprobe, seed=seed)
    hits = [pos + np.flatnonzero(scores[:, 0] > cfg.decontamination_threshold)
            for pos, scores, _ in search(index, x, 1, rows=rows)]
    return np.concatenate(hits)


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


def _exact_representatives(digests: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """(n,) the best-ranked item with the same digest as each item."""
    _, group = np.unique(digests, return_inverse=True)
    order = np.lexsort((rank, group))
    first = np.r_[True, group[order][1:] != group[order][:-1]]
    representative = np.empty(len(digests), dtype=np.int64)
    representative[order] = np.repeat(order[first], np.diff(np.r_[np.flatnonzero(first), len(order)]))
    return representative


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


def _groups(survivor: np.ndarray) -> list[np.ndarray]:
    """Groups of more than one item, each listed survivor first, then by ascending index; groups in
    ascending order of their survivor."""
    sizes = np.bincount(survivor, minlength=len(survivor))
    members = np.flatnonzero(sizes[survivor] > 1)
    if len(members) == 0:
        return []
    order = members[np.lexsort((members, members != survivor[members], survivor[members]))]
    starts = np.flatnonzero(np.r_[True, survivor[order][1:] != survivor[order][:-1]])
    return np.split(order, starts[1:])
