"""faiss helpers shared by dedup, k-means and retrieval: GPU when present, chunked everything.

Embeddings may be float16 memory-mapped `.npy` arrays far larger than RAM; every function here
reads them in row chunks, converts a chunk to float32 (faiss computes in float32) and never
materialises more than one chunk of distances at a time.
"""

from __future__ import annotations

from typing import Iterator

import faiss
import numpy as np

from dinoscale.errors import ConfigError, DataError

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
    index = on_device(faiss.IndexFlatL2(centroids.shape[1]))
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    stop = x.shape[0] if stop is None else stop
    assignment = np.empty(stop - start, dtype=np.int64)
    distances = np.empty(stop - start, dtype=np.float32)
    for pos, dist, ids in search(index, x, 1, normalize=False, rows=slice(start, stop), chunk_rows=chunk_rows):
        assignment[pos:pos + len(ids)] = ids[:, 0]
        distances[pos:pos + len(ids)] = dist[:, 0]
    return assignment, distances


FAISS_INIT_METHODS = {"afk-mc2": "AFK_MC2", "random": "RANDOM"}


def _faiss_init_method(name: str) -> int:
    constant = getattr(faiss, f"ClusteringInitMethod_{FAISS_INIT_METHODS[name]}", None)
    if constant is None:
        raise ConfigError(f"curation.kmeans.init = {name!r} needs a faiss with ClusteringInitMethod (1.15 has it; "
                          f"this one is {faiss.__version__}); upgrade faiss or choose init=kmeans++")
    return constant


def train_kmeans(points: np.ndarray, k: int, n_iter: int, seed: int, init: str | np.ndarray = "random") -> np.ndarray:
    """faiss k-means (Lloyd) on all of `points`; returns float32 (k, D) centroids.

    `init` is either (k, D) starting centroids or the name of a faiss seeding ("random", "afk-mc2").
    faiss would silently subsample to 256 points per centroid; the callers decide what to train
    on (see `KMeansConfig.train_sample`), so that is switched off, as is the warning faiss
    prints for fewer than 39 points per centroid (resampling steps train on a few per centroid).
    """
    points = np.ascontiguousarray(points, dtype=np.float32)
    n = points.shape[0]
    options = {}
    if isinstance(init, str) and init != "random":
        options["init_method"] = _faiss_init_method(init)
    kmeans = faiss.Kmeans(points.shape[1], k, niter=n_iter, seed=seed, gpu=gpu_available(),
                          min_points_per_centroid=1, max_points_per_centroid=n // k + 1, **options)
    kmeans.train(points, init_centroids=None if isinstance(init, str) else np.ascontiguousarray(init, np.float32))
    return kmeans.centroids
