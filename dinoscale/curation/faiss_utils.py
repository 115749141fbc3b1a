"""faiss helpers shared by dedup, k-means and retrieval: GPU when present, chunked everything.

Embeddings may be float16 memory-mapped `.npy` arrays far larger than RAM; every function here
reads them in row chunks, converts a chunk to float32 (faiss computes in float32) and never
materialises more than one chunk of distances at a time.
"""

from __future__ import annotations

from typing import Iterator

import faiss
import numpy as np

from dinoscale.errors import DataError

DEFAULT_CHUNK_ROWS = 65536


def gpu_available() -> bool:
    """True when this faiss build sees a GPU (faiss-gpu on a CUDA machine)."""
    return getattr(faiss, "get_num_gpus", lambda: 0)() > 0


def on_device(index: faiss.Index) -> faiss.Index:
    """The same index moved to all GPUs when there are any, else unchanged."""
    return faiss.index_cpu_to_all_gpus(index) if gpu_available() else index


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
    n_centroids)) int64 and float32."""
    n_nearest = min(n_nearest, centroids.shape[0])
    index = on_device(faiss.IndexFlatL2(centroids.shape[1]))
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    rows = slice(0, x.shape[0]) if rows is None else rows
    n_rows = len(range(*rows.indices(x.shape[0]))) if isinstance(rows, slice) else len(rows)
    ids = np.empty((n_rows, n_nearest), dtype=np.int64)
    distances = np.empty((n_rows, n_nearest), dtype=np.float32)
    for pos, dist, found in search(index, x, n_nearest, normalize=False, rows=rows, chunk_rows=chunk_rows):
        ids[pos:pos + len(found)] = found
        distances[pos:pos + len(found)] = dist
    return ids, distances
