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
    """Raise DataError unless `x` is a 2-D array of finite-looking floats with at least one row."""
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
              start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first row index, float32 chunk) over rows start:stop of `x`."""
    stop = x.shape[0] if stop is None else stop
    for lo in range(start, stop, chunk_rows):
        chunk = x[lo:min(lo + chunk_rows, stop)]
        yield lo, l2_normalize(chunk) if normalize else np.ascontiguousarray(chunk, dtype=np.float32)


def inner_product_index(x: np.ndarray, ivf_min_size: int, nprobe: int, seed: int = 0,
                        chunk_rows: int = DEFAULT_CHUNK_ROWS) -> faiss.Index:
    """A cosine index over the L2-normalised rows of `x`.

    Exact (flat) below `ivf_min_size` rows; above, an inverted file with about 4*sqrt(N) lists
    trained on a sample, searched with `nprobe` lists, so each query scans a small fraction.
    """
    n, d = x.shape
    if n < ivf_min_size:
        index = on_device(faiss.IndexFlatIP(d))
    else:
        nlist = int(min(max(4 * np.sqrt(n), 16), n // 39))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, 256 * nlist), replace=False))
        index.cp.min_points_per_centroid = 1
        index.train(l2_normalize(x[sample]))
        index.nprobe = nprobe
        index = on_device(index)
    for _, chunk in iter_rows(x, chunk_rows, normalize=True):
        index.add(chunk)
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int, chunk_rows: int = DEFAULT_CHUNK_ROWS,
           normalize: bool = True, start: int = 0, stop: int | None = None
           ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (first query row, similarities or distances (q, k), ids (q, k)) chunk by chunk."""
    k = min(k, index.ntotal)
    for lo, chunk in iter_rows(queries, chunk_rows, normalize=normalize, start=start, stop=stop):
        dist, ids = index.search(chunk, k)
        yield lo, dist, ids


def nearest_centroid(x: np.ndarray, centroids: np.ndarray, start: int = 0, stop: int | None = None,
                     chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """For rows start:stop of `x`: the nearest centroid (L2) and the squared distance to it."""
    index = on_device(faiss.IndexFlatL2(centroids.shape[1]))
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    stop = x.shape[0] if stop is None else stop
    assignment = np.empty(stop - start, dtype=np.int64)
    distances = np.empty(stop - start, dtype=np.float32)
    for lo, dist, ids in search(index, x, 1, chunk_rows, normalize=False, start=start, stop=stop):
        assignment[lo - start:lo - start + len(ids)] = ids[:, 0]
        distances[lo - start:lo - start + len(ids)] = dist[:, 0]
    return assignment, distances


def train_kmeans(points: np.ndarray, k: int, n_iter: int, seed: int) -> np.ndarray:
    """faiss k-means (Lloyd, random init) on all of `points`; returns float32 (k, D) centroids.

    faiss would silently subsample to 256 points per centroid; the callers decide what to train
    on (see `KMeansConfig.train_sample`), so that is switched off, as is the warning faiss
    prints for fewer than 39 points per centroid (resampling steps train on a few per centroid).
    """
    points = np.ascontiguousarray(points, dtype=np.float32)
    n = points.shape[0]
    kmeans = faiss.Kmeans(points.shape[1], k, niter=n_iter, seed=seed, gpu=gpu_available(),
                          min_points_per_centroid=1, max_points_per_centroid=n // k + 1)
    kmeans.train(points)
    return kmeans.centroids
