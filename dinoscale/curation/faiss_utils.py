"""faiss helpers shared by dedup, k-means and retrieval: GPU when present, chunked everything.

Embeddings may be float16 memory-mapped `.npy` arrays far larger than RAM; every function here
reads them in row chunks, converts a chunk to float32 (faiss computes in float32) and never
materialises more than one chunk of distances at a time.
"""

from __future__ import annotations

import functools
from typing import Iterator

import faiss
import numpy as np
import torch
import torch.distributed as dist

from dinoscale.errors import DataError

DEFAULT_CHUNK_ROWS = 65536
EXTRA_PROPOSALS = 8  # nearest-centroid proposals beyond the n asked for: near ties are settled among them


def gpu_available() -> bool:
    """True when this faiss build sees a GPU (faiss-gpu on a CUDA machine)."""
    return getattr(faiss, "get_num_gpus", lambda: 0)() > 0


def on_device(index: faiss.Index) -> faiss.Index:
    """The same index on the GPU when faiss sees one, else unchanged. One of several ranks takes its
    own GPU (torch's current device, which the process group set up); a single process takes all."""
    if not gpu_available():
        return index
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return faiss.index_cpu_to_gpu(_gpu_resources(), torch.cuda.current_device(), index)
    return faiss.index_cpu_to_all_gpus(index)


@functools.cache
def _gpu_resources() -> "faiss.StandardGpuResources":
    return faiss.StandardGpuResources()


def check_embeddings(x: np.ndarray, name: str) -> None:
    """Raise DataError unless `x` is a non-empty 2-D array of floats."""
    if not hasattr(x, "ndim") or x.ndim != 2:
        raise DataError(f"{name} must be a 2-D array of shape (N, D); got shape {getattr(x, 'shape', None)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"{name} is empty (shape {x.shape}); embed some images first")
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{name} must hold floats; got dtype {x.dtype}")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm, as contiguous float32 (all-zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float32).tiny)


def iter_rows(x: np.ndarray, chunk_rows: int = DEFAULT_CHUNK_ROWS, normalize: bool = False,
              rows: slice | np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (position of the chunk's first row within `rows`, float32 chunk) over `rows` of `x`.

    `rows` is a contiguous slice (best for memory maps), an index array, or None for all rows.
    """
    rows = slice(0, x.shape[0]) if rows is None else rows
    if isinstance(rows, slice):
        start, stop, _ = rows.indices(x.shape[0])
        chunks = ((lo - start, x[lo:min(lo + chunk_rows, stop)]) for lo in range(start, stop, chunk_rows))
    else:
        chunks = ((lo, x[rows[lo:lo + chunk_rows]]) for lo in range(0, len(rows), chunk_rows))
    for pos, chunk in chunks:
        yield pos, l2_normalize(chunk) if normalize else np.ascontiguousarray(chunk, dtype=np.float32)


def inner_product_index(x: np.ndarray, ivf_min_size: int, nprobe: int, rows: slice | np.ndarray | None = None,
                        seed: int = 0, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> faiss.Index:
    """A cosine index over the L2-normalised `rows` of `x` (ids are positions within `rows`).

    Exact (flat) below `ivf_min_size` vectors; from there an inverted file with about 4*sqrt(N)
    lists trained on 64 points per list, of which a search scans `nprobe`.
    """
    rows = slice(0, x.shape[0]) if rows is None else rows
    row_ids = range(*rows.indices(x.shape[0])) if isinstance(rows, slice) else rows
    n, d = len(row_ids), x.shape[1]
    if n < ivf_min_size:
        index = on_device(faiss.IndexFlatIP(d))
    else:
        nlist = int(min(max(4 * np.sqrt(n), 16), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, 64 * nlist), replace=False))
        index.cp.min_points_per_centroid = 1
        sample_ids = row_ids.start + sample * row_ids.step if isinstance(row_ids, range) else row_ids[sample]
        index.train(l2_normalize(x[sample_ids]))
        index.nprobe = nprobe
        index = on_device(index)
    for _, chunk in iter_rows(x, chunk_rows, normalize=True, rows=rows):
        index.add(chunk)
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int, normalize: bool = True,
           rows: slice | np.ndarray | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS
           ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (position of the first query within `rows`, scores (q, k), ids (q, k)) chunk by chunk."""
    k = min(k, index.ntotal)
    for pos, chunk in iter_rows(queries, chunk_rows, normalize=normalize, rows=rows):
        scores, ids = index.search(chunk, k)
        yield pos, scores, ids


def nearest_centroid(x: np.ndarray, centroids: np.ndarray, start: int = 0, stop: int | None = None,
                     chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """For rows start:stop of `x`: the nearest centroid (L2) and the squared distance to it."""
    ids, distances = nearest_centroids(x, centroids, 1, slice(start, x.shape[0] if stop is None else stop),
                                       chunk_rows)
    return ids[:, 0], distances[:, 0]


def nearest_centroids(x: np.ndarray, centroids: np.ndarray, n_nearest: int, rows: slice | np.ndarray | None = None,
                      chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """For `rows` of `x` (a slice, an index array, or None for all): the `n_nearest` nearest
    centroids (L2), nearest first, and the squared distances to them; (rows, min(n_nearest,
    n_centroids)) int64 and float32.

    The answer is exact, whatever faiss's arithmetic: faiss's float32 distances (whose last bits
    change with the number of threads and the batch) only propose the order, and a row whose
    proposal is within faiss's rounding bound of a tie is decided again in float64 (equal float64
    distances go to the smaller id): among faiss's `n_nearest + EXTRA_PROPOSALS` proposals when the
    last of them is clear of the tie, else among all centroids. The distances returned are float64
    ones rounded to float32. So the same row gets the same answer in any batch, on any number of
    threads or ranks."""
    n_nearest = min(n_nearest, centroids.shape[0])
    c64 = np.asarray(centroids, dtype=np.float64)
    index = on_device(faiss.IndexFlatL2(centroids.shape[1]))
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    rows = slice(0, x.shape[0]) if rows is None else rows
    n_rows = len(range(*rows.indices(x.shape[0]))) if isinstance(rows, slice) else len(rows)
    ids = np.empty((n_rows, n_nearest), dtype=np.int64)
    distances = np.empty((n_rows, n_nearest), dtype=np.float32)
    n_proposed = min(n_nearest + EXTRA_PROPOSALS, len(c64))
    largest_sq_norm = float((c64 * c64).sum(axis=1).max())
    for pos, faiss_distances, found in search(index, x, n_proposed, normalize=False, rows=rows, chunk_rows=chunk_rows):
        where = (slice(rows.start + pos, rows.start + pos + len(found)) if isinstance(rows, slice)
                 else rows[pos:pos + len(found)])
        chunk = np.asarray(x[where], dtype=np.float64)
        chunk_ids, chunk_distances = _exact_order(chunk, c64, faiss_distances, found, n_nearest, largest_sq_norm)
        ids[pos:pos + len(found)], distances[pos:pos + len(found)] = chunk_ids, chunk_distances
    return ids, distances


def squared_distances(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Squared L2 distance of row i of `x` (n, D) to each of its centroids `c` (n, m, D), in float64,
    summed in a fixed order (`_componentwise_sum`): the same bits for a pair in any batch."""
    return _componentwise_sum(lambda lo, hi: c[lo:hi] - x[lo:hi, None], len(x), c.shape[1], c.shape[2], square=True)


def row_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot product of row i of `a` with row i of `b` (both (n, D)) in float64, summed in a fixed order."""
    return _componentwise_sum(lambda lo, hi: a[lo:hi, None] * b[lo:hi, None], len(a), 1, a.shape[1])[:, 0]


def _componentwise_sum(terms, n: int, m: int, d: int, square: bool = False) -> np.ndarray:
    """(n, m) sums over the last axis of `terms(lo, hi)` ((hi - lo, m, d), squared first if asked),
    added one component at a time, element-wise: a library reduction may change its order with the
    data's alignment or length, this one cannot."""
    out = np.empty((n, m))
    rows_per_chunk = max(1, 2 ** 22 // (m * d))
    for lo in range(0, n, rows_per_chunk):
        hi = min(lo + rows_per_chunk, n)
        components = np.ascontiguousarray(np.moveaxis(np.asarray(terms(lo, hi), dtype=np.float64), -1, 0))
        total = np.zeros(components.shape[1:])
        for component in components:
            total += component * component if square else component
        out[lo:hi] = total
    return out


def _exact_order(x: np.ndarray, c: np.ndarray, proposed: np.ndarray, proposed_ids: np.ndarray, n_nearest: int,
                 largest_sq_norm: float) -> tuple[np.ndarray, np.ndarray]:
    """The `n_nearest` nearest centroids of each row of `x` and their float64 squared distances, from
    faiss's proposal (the nearest float32 distances and their ids, nearest first; at least
    `n_nearest` + 1 of them, or all centroids).

    A float32 squared distance |x|^2 + |c|^2 - 2x.c, or sum((x - c)^2), is within
    e = 2(D + 4)u(|x|^2 + |c|^2) of the exact one (u = 2^-24); two proposals further apart than 2e
    are in the right order. A row with a closer pair among its first `n_nearest` + 1 proposals is
    re-decided in float64: among its proposals when the last one lies more than 2e beyond the
    `n_nearest`-th (every centroid not proposed is then further than the `n_nearest` nearest
    proposals, exactly), else among all centroids; so is a row with unknown (-1) ids."""
    d = x.shape[1]
    margin = 4 * (d + 4) * 2.0 ** -24 * ((x * x).sum(axis=1) + largest_sq_norm)
    proposed = proposed.astype(np.float64)
    gaps = np.diff(proposed[:, :n_nearest + 1], axis=1)
    unknown = (proposed_ids < 0).any(axis=1)
    unsure = (gaps <= margin[:, None]).any(axis=1) | unknown
    ids = proposed_ids[:, :n_nearest].copy()
    sure = np.flatnonzero(~unsure)
    exact = np.empty(ids.shape)
    exact[sure] = squared_distances(x[sure], c[ids[sure]])
    all_proposed = proposed.shape[1] == len(c)
    within_proposals = unsure & ~unknown & (all_proposed | (proposed[:, -1] - proposed[:, n_nearest - 1] > margin))
    rows = np.flatnonzero(within_proposals)
    candidates = proposed_ids[rows]
    distances = squared_distances(x[rows], c[candidates])
    order = np.lexsort((candidates, distances), axis=1)[:, :n_nearest]  # by distance, then id
    ids[rows] = np.take_along_axis(candidates, order, axis=1)
    exact[rows] = np.take_along_axis(distances, order, axis=1)
    unsure_rows = np.flatnonzero(unsure & ~within_proposals)
    rows_per_chunk = max(1, 2 ** 22 // (len(c) * d))
    for lo in range(0, len(unsure_rows), rows_per_chunk):
        rows = unsure_rows[lo:lo + rows_per_chunk]
        everything = squared_distances(x[rows], np.broadcast_to(c, (len(rows), *c.shape)))
        order = np.argsort(everything, axis=1, kind="stable")[:, :n_nearest]
        ids[rows] = order
        exact[rows] = np.take_along_axis(everything, order, axis=1)
    return ids, exact.astype(np.float32)
