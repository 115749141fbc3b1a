"""The curated selection written as shuffled webdataset tar shards, plus a manifest.

Shard s holds items `order[s * shard_size:(s + 1) * shard_size]` of one seeded permutation of
the selection, so any worker can write any shard on its own: a SLURM array task writes a
contiguous slice of shard ids (`shard_ids_of_slice`) and `write_manifest` joins them. Each
shard is written to a temporary file and renamed, so a killed task leaves whole shards only.

Inside a shard, sample `KEY` is `KEY.<image_format>` + `KEY.json`; KEY is the item's position
in the shuffled order. The JSON holds the item's pool key and index, how it was selected
(`source`), its cluster at every level (`cluster_path`, finest first) and its duplicate
group. An image already encoded in `image_format` keeps its original bytes; others are
decoded as the pool decodes them and re-encoded. `open_pool(shard_folder)` reads the result.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from webdataset import TarWriter

from dinoscale.data.pool import ImagePool, decode_image
from dinoscale.errors import DataError
from dinoscale.utils.io import atomic_path, write_json
from dinoscale.utils.logging import get_logger

log = get_logger(__name__)

PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
MANIFEST = "manifest.json"


@dataclass
class Selection:
    """The curated items, in selection order: pool indices and where each came from."""

    indices: np.ndarray  # (n,) int64 pool indices (may repeat)
    cluster_path: np.ndarray  # (n, n_levels) int64, -1 where an item has no cluster (e.g. retrieved seeds' pool items)
    source: np.ndarray  # (n,) int64 index into `source_names`
    source_names: list[str]
    duplicate_group: np.ndarray  # (n,) int64 duplicate-group id of the item's pool image

    def __len__(self) -> int:
        return len(self.indices)


def shuffled_order(n_items: int, seed: int) -> np.ndarray:
    """The seeded permutation that decides which shard holds which item."""
    return np.random.default_rng(seed).permutation(n_items)


def n_shards_for(n_items: int, shard_size: int) -> int:
    return math.ceil(n_items / shard_size)


def shard_name(shard_id: int) -> str:
    return f"{shard_id:06d}.tar"


def shard_ids_of_slice(n_shards: int, worker: int, n_workers: int) -> range:
    """The contiguous block of shard ids written by worker `worker` of `n_workers`."""
    if not 0 <= worker < n_workers:
        raise DataError(f"shard slice {worker}/{n_workers} is invalid: need 0 <= i < n")
    return range(worker * n_shards // n_workers, (worker + 1) * n_shards // n_workers)


def item_metadata(selection: Selection, position: int, pool: ImagePool) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "pool_key": pool.keys[int(selection.indices[position])],
        "pool_index": int(selection.indices[position]),
        "source": selection.source_names[int(selection.source[position])],
        "cluster_path": [int(c) for c in selection.cluster_path[position]],
        "duplicate_group": int(selection.duplicate_group[position]),
    }
    if pool.labels is not None and pool.class_names is not None:
        meta["label"] = pool.class_names[pool.labels[int(selection.indices[position])]]
    return meta


def encoded_image(data: bytes, pool: ImagePool, image_format: str, quality: int) -> tuple[bytes | None, bool]:
    """(bytes in `image_format`, whether they were re-encoded); None when the image cannot be decoded."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            already = probe.format == PIL_FORMATS[image_format]
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        already = False
    decoded = decode_image(data, pool.max_pixels, pool.min_side)
    if decoded.image is None:
        return None, False
    if already:
        return data, False
    buf = io.BytesIO()
    options = {"quality": quality} if image_format in ("jpg", "webp") else {}
    decoded.image.save(buf, format=PIL_FORMATS[image_format], **options)
    return buf.getvalue(), True


def write_shard(path: Path, positions: Sequence[int], first_key: int, selection: Selection, pool: ImagePool,
                image_format: str, quality: int) -> dict[str, int]:
    """Write the items at `positions` of the selection as one tar, atomically; returns its counts."""
    counts = Counter(n_items=0, n_reencoded=0, n_unreadable=0)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as stream:
            # fixed mtime, user and group: the same selection always gives the same bytes
            writer = TarWriter(stream, encoder=False, mtime=0.0, user="dinoscale", group="dinoscale")
            for offset, position in enumerate(positions):
                index = int(selection.indices[position])
                image, reencoded = encoded_image(pool.read_bytes(index), pool, image_format, quality)
                if image is None:
                    log.warning("shard %s: skipping unreadable image %s", path.name, pool.keys[index])
                    counts["n_unreadable"] += 1
                    continue
                meta = item_metadata(selection, int(position), pool)
                writer.write({"__key__": f"{first_key + offset:010d}", image_format: image,
                              "json": json.dumps(meta, sort_keys=True).encode()})
                counts["n_items"] += 1
                counts["n_reencoded"] += int(reencoded)
            writer.close()
            stream.flush()
            os.fsync(stream.fileno())
    return dict(counts)


def write_shard_slice(out_dir: str | Path, selection: Selection, pool: ImagePool, shard_size: int,
                      image_format: str, quality: int, seed: int, worker: int = 0, n_workers: int = 1
                      ) -> dict[str, dict[str, int]]:
    """Write this worker's shards; returns {shard name: counts}."""
    out_dir = Path(out_dir)
    order = shuffled_order(len(selection), seed)
    stats = {}
    for shard_id in shard_ids_of_slice(n_shards_for(len(selection), shard_size), worker, n_workers):
        start = shard_id * shard_size
        positions = order[start:start + shard_size]
        stats[shard_name(shard_id)] = write_shard(out_dir / shard_name(shard_id), positions, start, selection, pool,
                                                  image_format, quality)
    return stats


def write_manifest(out_dir: str | Path, selection: Selection, pool: ImagePool, shard_stats: dict[str, dict[str, int]],
                   shard_size: int, image_format: str, config_hash: str) -> dict[str, Any]:
    """Check every planned shard is there, remove stale ones, and write manifest.json."""
    out_dir = Path(out_dir)
    expected = [shard_name(s) for s in range(n_shards_for(len(selection), shard_size))]
    missing = [name for name in expected if name not in shard_stats or not (out_dir / name).exists()]
    if missing:
        raise DataError(f"shards {missing[:5]} of {out_dir} are not written; rerun the shard tasks that write them")
    for stale in sorted(set(p.name for p in out_dir.glob("*.tar")) - set(expected)):
        (out_dir / stale).unlink()
    top = selection.cluster_path[:, -1] if selection.cluster_path.shape[1] else np.zeros(0, dtype=np.int64)
    manifest: dict[str, Any] = {
        "config_hash": config_hash,
        "image_format": image_format,
        "shard_size": shard_size,
        "n_selected": len(selection),
        "n_items": sum(shard_stats[name]["n_items"] for name in expected),
        "n_reencoded": sum(shard_stats[name]["n_reencoded"] for name in expected),
        "n_unreadable": sum(shard_stats[name]["n_unreadable"] for name in expected),
        "n_unique_images": int(len(np.unique(selection.indices))),
        "shards": [{"name": name, "n_items": shard_stats[name]["n_items"]} for name in expected],
        "sources": _histogram(selection.source_names[s] for s in selection.source.tolist()),
        "clusters_per_level": [int(len(np.unique(level[level >= 0]))) for level in selection.cluster_path.T],
        "top_level_cluster_histogram": _histogram(int(c) for c in top.tolist() if c >= 0),
    }
    if pool.labels is not None and pool.class_names is not None:
        manifest["class_histogram"] = _histogram(pool.class_names[pool.labels[i]] for i in selection.indices.tolist())
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def _histogram(values: Any) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(values).items())}
