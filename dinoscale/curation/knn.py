"""Cosine k-NN over rows shared out to ranks: each rank indexes its own rows, every query visits
every rank's shard, and decisions against a threshold are the same on any world size.

Rows are L2-normalised. Below `ivf_min_size` rows in all, each shard is an exact (flat, float32)
faiss index. From there it is an inverted file of about 4 sqrt(N) lists (k-means on 64 points per
list drawn from all ranks, `lloyd`) whose vectors are stored in 8 bits per dimension over the
range every dimension spans on all ranks: a quarter of float32's memory. The lists are the same
on every rank, so the shards together are one index cut by rows. Which list a row goes into and
which `nprobe` lists a query scans are found block by block (fixed blocks of rows, `collective`)
with float32 torch GEMMs, the same on any world size; faiss scans the lists.

Queries leave the rank that owns them in blocks (one broadcast per block), and every rank answers
the owner alone (one gather) with its best rows by the index's score: k of them from the exact
index; from the inverted file, whose 8-bit scores can misorder close rows, k + max(k,
`MIN_RERANK_MARGIN`). The index's score tells on which side of the caller's threshold a pair lies
unless it is within the score's error bound of it (float32 rounding; plus the 8-bit quantisation
error, at most half a step per dimension, for the inverted file), so every candidate that may lie
above the threshold is scored again on the cosine of the stored embeddings in float64
(`exact_cosines`), by the rank that holds the indexed row (a query that is itself an indexed row
meets that row at cosine 1, which is not read again). The owner keeps the best candidates of all
answers by the index's score, then id, and of those the k best by the refined score, then id. Both
choices depend on the query and the row alone, never on the number of ranks; and the neighbours
above the threshold among a query's k nearest are the exact ones whenever the candidates hold them
(an exact index, or an inverted file that probes their lists, with a margin wider than its
misordering).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import faiss
import numpy as np
import torch

from dinoscale.curation.collective import Comm, blocks_of
from dinoscale.curation.faiss_utils import l2_normalize, on_device, row_dots
from dinoscale.curation.lloyd import lloyd
from dinoscale.curation.points import Points
from dinoscale.curation.store import RowSubset
from dinoscale.utils.device import default_device

FP32_UNIT_ROUNDOFF = 2.0 ** -24
MIN_RERANK_MARGIN = 8
TRAINING_POINTS_PER_LIST = 64
QUANTIZER_ITERATIONS = 10
SCORE_CHUNK_BYTES = 64 * 2**20  # rows x lists scores at a time: a whole block of them is 829 MB at 10^7 rows


def n_inverted_lists(n_rows: int) -> int:
    """How many lists the inverted file of `n_rows` rows has: about 4 sqrt(N), at least 39 rows each."""
    return int(min(max(4 * np.sqrt(n_rows), 16), n_rows // 39))


class Normalized:
    """Rows of an (N, D) array-like, L2-normalised as float32 when read."""

    def __init__(self, x: Any):
        self.x, self.shape, self.dtype = x, x.shape, np.dtype(np.float32)

    def __getitem__(self, key: Any) -> np.ndarray:
        return l2_normalize(self.x[key])


@dataclass
class Neighbours:
    """For each query: its k nearest indexed rows (global ids, -1 where there are fewer), their
    cosines, and whether each lies above the threshold the search was asked about."""

    ids: np.ndarray  # (q, k) int64
    scores: np.ndarray  # (q, k) float32 (float64 cosine for the pairs that may lie above the threshold)
    above: np.ndarray  # (q, k) bool
    index_scores: np.ndarray  # (q, k) float32: the index's own scores, which choose the candidates


class ShardedCosineIndex:
    """Rows `ids` (sorted global row numbers, this rank's share) of `x` in one cosine index over all
    ranks of `comm`."""

    def __init__(self, x: Any, ids: np.ndarray, comm: Comm, ivf_min_size: int, nprobe: int, seed: int = 0):
        self.x, self.ids, self.comm, self.dim = x, np.asarray(ids, dtype=np.int64), comm, x.shape[1]
        self.blocks = _row_blocks(self.ids)
        n_total = int(comm.sum(np.array([len(self.ids)]))[0])
        self.quantizer: ListCentroids | None = None
        if n_total < ivf_min_size:
            self.index = on_device(faiss.IndexFlatIP(self.dim))
            self.step = np.zeros(self.dim)
        else:
            nlist = n_inverted_lists(n_total)
            self.quantizer = ListCentroids(self._train_lists(nlist, n_total, seed))
            vmin, vdiff = self._value_range()
            index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(self.dim), self.dim, nlist,
                                                  faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT, False)
            index.quantizer.add(self.quantizer.centroids)
            faiss.copy_array_to_vector(np.concatenate([vmin, vdiff]).astype(np.float32), index.sq.trained)
            index.is_trained = True
            index.nprobe = min(nprobe, nlist)
            self.index = index
            self.step = vdiff / 255.0  # a code is at most half a step from its value; a whole step is safe
        self.own_probes: np.ndarray | None = None
        if self.quantizer is None:
            for block in self.blocks:
                self.index.add(l2_normalize(x[self.ids[block]]))
        else:
            self._fill_lists()

    # ------------------------------------------------------------------ building
    def _fill_lists(self) -> None:
        """Put this rank's rows into the inverted file, each into its nearest list. The `nprobe` nearest
        lists of every row are kept (`own_probes`, int32): the first is the row's list, and all of them
        are what the row scans when it is itself a query (dedup's queries are the indexed rows), so
        those GEMMs run once. Each list is sized before it is filled: lists grown row by row hold up to
        twice their codes. So the rows are read twice, once to count each list's rows and once to write
        their codes; holding the codes between the passes would double the index's memory."""
        self.own_probes = np.concatenate([np.zeros((0, self.index.nprobe), dtype=np.int32)] + [
            self.quantizer.nearest(l2_normalize(self.x[self.ids[block]]), self.index.nprobe).astype(np.int32)
            for block in self.blocks])
        lists = self.own_probes[:, 0]
        invlists = faiss.downcast_InvertedLists(self.index.invlists)
        for lst, size in enumerate(np.bincount(lists, minlength=self.index.nlist).tolist()):
            if size:
                invlists.resize(lst, size)
        filled = np.zeros(self.index.nlist, dtype=np.int64)
        for block in self.blocks:
            rows = l2_normalize(self.x[self.ids[block]])
            codes = self.index.sq.compute_codes(rows)
            order = np.argsort(lists[block], kind="stable")
            block_lists, codes, row_ids = lists[block][order], codes[order], self.ids[block][order]
            starts = np.flatnonzero(np.r_[True, np.diff(block_lists) != 0])
            for start, stop in zip(starts.tolist(), np.r_[starts[1:], len(order)].tolist()):
                lst = int(block_lists[start])
                invlists.update_entries(lst, int(filled[lst]), stop - start, faiss.swig_ptr(row_ids[start:stop]),
                                        faiss.swig_ptr(codes[start:stop]))
                filled[lst] += stop - start
        self.index.ntotal = len(self.ids)

    def _train_lists(self, nlist: int, n_total: int, seed: int) -> np.ndarray:
        """k-means centroids of a sample of all ranks' indexed rows (random initial centroids)."""
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n_total, size=min(n_total, TRAINING_POINTS_PER_LIST * nlist), replace=False))
        first = int(self.comm.concat(np.array([len(self.ids)]), [1] * self.comm.world)[:self.comm.rank].sum())
        indexed = Points(Normalized(RowSubset(self.x, self.ids)), n_total, self.dim,
                         range(first, first + len(self.ids)), first, self.comm)
        points = indexed.take(sample)
        start = points.gather(np.sort(rng.choice(points.n, size=nlist, replace=False)))
        return lloyd(points, start, QUANTIZER_ITERATIONS, "bfloat16")

    def _value_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Per dimension, the smallest value and the span of the normalised rows of all ranks."""
        low, high = np.full(self.dim, np.inf, dtype=np.float32), np.full(self.dim, -np.inf, dtype=np.float32)
        for block in self.blocks:
            rows = l2_normalize(self.x[self.ids[block]])
            low, high = np.minimum(low, rows.min(axis=0)), np.maximum(high, rows.max(axis=0))
        low, high = self.comm.min(low), self.comm.max(high)
        return low, np.maximum(high - low, np.finfo(np.float32).tiny)

    # ------------------------------------------------------------------ searching
    def search(self, x: Any, ids: np.ndarray, k: int, threshold: float,
               on_result: Callable[[np.ndarray, Neighbours], None]) -> None:
        """Search rows `ids` (this rank's queries, sorted global rows) of `x` against every shard;
        `on_result(query ids, Neighbours)` is called here for each block of them. A collective:
        every rank calls it, with its own queries."""
        blocks = _row_blocks(np.asarray(ids, dtype=np.int64))
        indexed_rows = self.own_probes is not None and x is self.x and np.array_equal(ids, self.ids)
        n_blocks = self.comm.concat(np.array([len(blocks)], dtype=np.int64), [1] * self.comm.world)
        for owner in range(self.comm.world):
            for b in range(int(n_blocks[owner])):
                mine = owner == self.comm.rank
                query_ids = ids[blocks[b]] if mine else np.zeros(0, dtype=np.int64)
                queries = l2_normalize(x[query_ids]) if mine else np.zeros((0, self.dim), dtype=np.float32)
                # found once, by the owner; they travel with the queries
                probes = self.own_probes[blocks[b]].astype(np.int64) if mine and indexed_rows else self._probes(queries)
                n_queries = int(self.comm.broadcast(len(query_ids), src=owner))
                query_ids, queries, probes = (self.comm.share(part, owner, n_queries)
                                              for part in (query_ids, queries, probes))
                found = self._search_shard(queries, probes, k + self.margin(k), threshold,
                                           query_ids if x is self.x else None)
                answers = [self.comm.gather(part, owner) for part in (found.ids, found.scores, found.above,
                                                                      found.index_scores)]
                if mine:
                    on_result(query_ids, _merge(*answers, self.comm.world, k, k + self.margin(k)))

    def margin(self, k: int) -> int:
        """How many candidates beyond the k nearest a shard returns per query."""
        return 0 if self.quantizer is None else max(k, MIN_RERANK_MARGIN)

    def _probes(self, queries: np.ndarray) -> np.ndarray:
        """The lists each query scans ((q, 0) for an exact index)."""
        if self.quantizer is None:
            return np.zeros((len(queries), 0), dtype=np.int64)
        return self.quantizer.nearest(queries, self.index.nprobe)

    def _search_shard(self, queries: np.ndarray, probes: np.ndarray, k: int, threshold: float,
                      own_ids: np.ndarray | None) -> Neighbours:
        """This shard's k best rows by the index's score for each query (scanning lists `probes` of an
        inverted file), scored exactly where they may lie above the threshold. `own_ids` are the queries'
        ids when they are rows of the indexed array: a query meets its own row at cosine 1."""
        if self.index.ntotal == 0:
            shape = (len(queries), k)
            nothing = np.full(shape, -np.inf, dtype=np.float32)
            return Neighbours(np.full(shape, -1), nothing, np.zeros(shape, bool), nothing)
        if self.quantizer is None:
            index_scores, positions = self.index.search(queries, k)
            found = np.where(positions >= 0, self.ids[np.maximum(positions, 0)], -1)
        else:
            index_scores, found = self.index.search_preassigned(queries, k, probes,
                                                                np.zeros(probes.shape, np.float32))
        error = np.abs(queries) @ self.step + 2 * (self.dim + 4) * FP32_UNIT_ROUNDOFF
        scores, above = index_scores.astype(np.float64), (index_scores > threshold) & (found >= 0)
        maybe_above = (index_scores >= threshold - error[:, None]) & (found >= 0)
        if own_ids is not None:
            itself = maybe_above & (found == own_ids[:, None])
            scores[itself], above[itself], maybe_above = 1.0, 1.0 > threshold, maybe_above & ~itself
        q, j = np.nonzero(maybe_above)
        if len(q):
            scores[q, j] = exact_cosines(queries[q], l2_normalize(self.x[found[q, j]]))
            above[q, j] = scores[q, j] > threshold
        return Neighbours(found, scores.astype(np.float32), above, index_scores)


def exact_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of row i of `a` with row i of `b`, in float64, summed in a fixed order (the same bits
    in any batch)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return np.clip(row_dots(a64, b64) / np.sqrt(row_dots(a64, a64) * row_dots(b64, b64)), -1.0, 1.0)


def _merge(ids: np.ndarray, scores: np.ndarray, above: np.ndarray, index_scores: np.ndarray, n_shards: int, k: int,
           n_candidates: int) -> Neighbours:
    """Each query's k best by score, then id, of its `n_candidates` best by the index's score, then id, of
    the shards' answers (stacked shard after shard)."""
    n = len(ids) // n_shards
    found = [a.reshape(n_shards, n, -1).transpose(1, 0, 2).reshape(n, -1) for a in (ids, scores, above, index_scores)]
    for by, keep in ((3, n_candidates), (1, k)):
        key_ids = np.where(found[0] >= 0, found[0], np.iinfo(np.int64).max)
        order = np.lexsort((key_ids, -found[by].astype(np.float64)), axis=1)[:, :keep]
        found = [np.take_along_axis(a, order, axis=1) for a in found]
    return Neighbours(*found)


class ListCentroids:
    """The inverted file's list centroids, held once on the device that assigns rows to lists (a GPU
    where there is one: at 10^9 rows these GEMMs cost as much as the scans)."""

    def __init__(self, centroids: np.ndarray):
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.device = default_device()
        self._c = torch.from_numpy(self.centroids).to(self.device)
        self._half_sq_norms = (self._c * self._c).sum(dim=1) / 2

    def nearest(self, rows: np.ndarray, n: int) -> np.ndarray:
        """The `n` nearest centroids (L2) of each row: float32 GEMMs over fixed chunks of the rows (callers
        pass fixed blocks), each chunk's scores at most `SCORE_CHUNK_BYTES`."""
        chunk = max(1, SCORE_CHUNK_BYTES // (4 * len(self.centroids)))
        found = []
        for lo in range(0, len(rows), chunk):
            scores = torch.from_numpy(rows[lo:lo + chunk]).to(self.device) @ self._c.T - self._half_sq_norms
            found.append(scores.topk(n, dim=1).indices.cpu().numpy().astype(np.int64))
        return np.concatenate(found) if found else np.zeros((0, n), dtype=np.int64)


def _row_blocks(ids: np.ndarray) -> list[slice]:
    """Positions in the sorted global row numbers `ids` of each fixed block of rows they fall in."""
    if len(ids) == 0:
        return []
    bounds = [b.start for b in blocks_of(range(0, int(ids[-1]) + 1))] + [int(ids[-1]) + 1]
    cuts = np.searchsorted(ids, bounds)
    return [slice(lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:]) if hi > lo]
