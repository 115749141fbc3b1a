"""Embedding a pool: L2-normalised vectors (float16, or float32 on request) aligned with the pool's item order.

The main embedder (`curation.embed.backbone`) is a backbone `load_backbone` reads (official
DINOv2/DINOv3 weights, a dinoscale export, or a dinoscale run directory through its
`export/teacher.pth`), or `pixels`: the ImageNet-normalised pixels of the image shrunk to
`image_size`, a model-free baseline. Its vectors feed clustering, sampling and retrieval.
Features are the CLS token, or with `features: cls_patchmean` the L2-normalised CLS and mean
patch tokens side by side (scaled so the whole vector has unit norm). The main embeddings can
also come from a precomputed (N, D) file (`embeddings_file`).

An optional second embedder (`copy_detection`) serves dedup only, as DINOv2 used a copy-
detection model for deduplication: a TorchScript model file the user gives (such as SSCD), or a
model-free one: `descriptor` (`copy_descriptor`: colour layout, gradient orientations and colour
histogram) or `pdq` (Meta's PDQ hash). Their measured precision and recall on real and synthetic
images are in `copy_descriptor.CALIBRATIONS` and configs/curate/small.yaml.

Work is split into slices of whole batches (`embed_slice_range`), so the batches, and hence the
bf16 numerics, are the same whatever the number of slices: the rows of slices 0..n-1 are the
single-process arrays byte for byte. A slice holds embeddings.npy (zero rows for unreadable
images; float16 by default, float32 on request), copy_embeddings.npy (with a copy-detection
embedder), valid.npy, content_hashes.npy (sha256 hex of the file bytes, read anyway to decode
them) and pixel_counts.npy. The slices stay where they are: `list_slices` makes them one row
store (`store`), which later stages read through memory maps, each rank its own rows.
"""

from __future__ import annotations

import hashlib
import math
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dinoscale.curation.config import EmbedConfig
from dinoscale.curation.copy_descriptor import CopyDescriptorEmbedder, PDQEmbedder
from dinoscale.curation.store import RowStore, write_parts_listing
from dinoscale.data.pool import ImagePool, decode_image, open_pool
from dinoscale.errors import ConfigError, DataError
from dinoscale.eval.features import eval_transform
from dinoscale.models import load_backbone
from dinoscale.utils.device import default_device, inference_autocast
from dinoscale.utils.io import atomic_path
from dinoscale.utils.logging import get_logger, progress

log = get_logger(__name__)

PIXELS = "pixels"
DESCRIPTOR = "descriptor"
PDQ = "pdq"
MODEL_FREE = (PIXELS, DESCRIPTOR, PDQ)
RUN_EXPORT = Path("export") / "teacher.pth"
MAIN, COPY = "embeddings", "copy_embeddings"
HASH_DTYPE = np.dtype("S64")
FILE_CHUNK_ROWS = 65536


class Embedder(Protocol):
    """Turns a batch of normalised images (B, 3, H, W) into L2-normalised float32 rows (B, D)."""

    dim: int
    image_size: int

    def __call__(self, images: Tensor) -> Tensor: ...


class PixelEmbedder:
    """The normalised pixels themselves, flattened: near copies stay close, nothing is learnt."""

    def __init__(self, image_size: int):
        self.image_size = image_size
        self.dim = 3 * image_size * image_size

    def __call__(self, images: Tensor) -> Tensor:
        return F.normalize(images.flatten(1).float(), dim=1)


class BackboneEmbedder:
    """CLS token (optionally with the mean patch token) of a frozen backbone, bf16 where supported."""

    def __init__(self, model: nn.Module, image_size: int, features: str, precision: str, device: torch.device):
        self.model = model.to(device).eval()
        self.image_size, self.features, self.precision, self.device = image_size, features, precision, device
        self.dim = model.embed_dim * (2 if features == "cls_patchmean" else 1)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        with inference_autocast(self.device, self.precision):
            out = self.model.forward_features(images.to(self.device, non_blocking=True))
        cls = F.normalize(out["x_norm_clstoken"].float(), dim=1)
        if self.features == "cls":
            return cls.cpu()
        patch_mean = F.normalize(out["x_norm_patchtokens"].float().mean(dim=1), dim=1)
        return (torch.cat([cls, patch_mean], dim=1) / math.sqrt(2.0)).cpu()


class TorchScriptEmbedder:
    """A TorchScript copy-detection model a user gives (DINOv2 deduplicated with SSCD, released as
    TorchScript): ImageNet-normalised images (B, 3, S, S) in, one descriptor row per image out,
    L2-normalised here."""

    def __init__(self, path: Path, image_size: int, precision: str, device: torch.device):
        with warnings.catch_warnings():  # TorchScript is how SSCD and its kin are released
            warnings.simplefilter("ignore", FutureWarning)
            self.model = torch.jit.load(str(path), map_location=device).eval()
        self.image_size, self.precision, self.device = image_size, precision, device
        with torch.no_grad():
            out = self.model(torch.zeros(1, 3, image_size, image_size, device=device))
        if out.ndim != 2:
            raise ConfigError(f"the TorchScript model {path} returns a tensor of shape {tuple(out.shape)} for one "
                              "image; a copy-detection model must return one descriptor row (1, D) per image")
        self.dim = out.shape[1]

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        with inference_autocast(self.device, self.precision):
            out = self.model(images.to(self.device, non_blocking=True))
        return F.normalize(out.float(), dim=1).cpu()


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip file with a code/ folder (torch.save writes none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def backbone_weights(backbone: str, key: str = "curation.embed.backbone") -> Path:
    """The weights file named by `backbone`: a file, or RUN/export/teacher.pth of a dinoscale run directory."""
    if not backbone:
        raise ConfigError(f"{key} is empty; give a weights file, a dinoscale run directory, `pixels`, "
                          "`descriptor`, or set curation.embed.embeddings_file")
    path = Path(backbone)
    if path.is_dir():
        if not (path / RUN_EXPORT).is_file():
            raise ConfigError(f"{key} = {backbone} is a directory without {RUN_EXPORT}; point at a training run "
                              "that exported its teacher, or at a weights file")
        return path / RUN_EXPORT
    if not path.is_file():
        raise ConfigError(f"{key} = {backbone} does not exist; give a weights file, a dinoscale run directory, "
                          "`pixels` or `descriptor`")
    return path


def build_embedder(backbone: str, image_size: int, cfg: EmbedConfig, key: str = "curation.embed.backbone",
                   device: torch.device | None = None) -> Embedder:
    """`pixels`, `descriptor` or a backbone, with the arch, features and precision of the `curation.embed`
    section `cfg`."""
    if backbone == PIXELS:
        return PixelEmbedder(image_size)
    if backbone == DESCRIPTOR:
        return CopyDescriptorEmbedder(image_size)
    if backbone == PDQ:
        return PDQEmbedder(image_size)
    weights = backbone_weights(backbone, key)
    device = device or default_device()
    if is_torchscript(weights):
        return TorchScriptEmbedder(weights, image_size, cfg.precision, device)
    model = load_backbone(weights, arch=cfg.arch)
    patch = model.patch_size
    if image_size % patch:
        raise ConfigError(f"the image size {image_size} for {key} is not a multiple of the backbone's patch size "
                          f"{patch}; pick e.g. {max(patch, image_size // patch * patch)}")
    return BackboneEmbedder(model, image_size, cfg.features, cfg.precision, device)


def pool_embedders(cfg: EmbedConfig) -> dict[str, Embedder]:
    """The embedders a `curation.embed` section runs on images: main (unless from a file) and copy detection."""
    embedders: dict[str, Embedder] = {}
    if not cfg.embeddings_file:
        embedders[MAIN] = build_embedder(cfg.backbone, cfg.image_size, cfg)
    if cfg.copy_detection:
        embedders[COPY] = build_embedder(cfg.copy_detection, cfg.copy_detection_image_size, cfg,
                                         key="curation.embed.copy_detection")
    return embedders


def embed_slice_range(n_items: int, batch_size: int, worker: int, n_workers: int) -> range:
    """The items of slice `worker` of `n_workers`: a contiguous run of whole batches."""
    if not 0 <= worker < n_workers:
        raise ConfigError(f"slice {worker}/{n_workers} is invalid: need 0 <= i < n")
    n_batches = math.ceil(n_items / batch_size)
    first, last = worker * n_batches // n_workers, (worker + 1) * n_batches // n_workers
    return range(min(first * batch_size, n_items), min(last * batch_size, n_items))


class _PoolImages(Dataset):
    """Item i of `indices`: (one tensor per image size, readable, sha256 hex, pixel count, skip reason)."""

    def __init__(self, pool: ImagePool, indices: range, image_sizes: Sequence[int]):
        self.pool, self.indices, self.image_sizes = pool, indices, list(image_sizes)
        self.transforms = [eval_transform(size) for size in self.image_sizes]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[list[Tensor], bool, str, int, str]:
        data = self.pool.read_bytes(self.indices[i])
        digest = hashlib.sha256(data).hexdigest()
        decoded = decode_image(data, self.pool.max_pixels, self.pool.min_side)
        if decoded.image is None:
            blanks = [torch.zeros(3, size, size) for size in self.image_sizes]
            return blanks, False, digest, 0, decoded.skip_reason or "unreadable"
        width, height = decoded.image.size
        return [t(decoded.image) for t in self.transforms], True, digest, width * height, ""


@dataclass
class SliceEmbeddings:
    """What one slice of the pool gives; row j belongs to pool item `start + j`."""

    start: int
    arrays: dict[str, np.ndarray]  # MAIN (and COPY) (n, D) float16/32; valid; content_hashes; pixel_counts
    skipped: dict[str, int] = field(default_factory=dict)


def embed_slice(pool: ImagePool | None, indices: range, embedders: dict[str, Embedder], embeddings_file: str,
                batch_size: int, num_workers: int, dtype: str = "float16") -> SliceEmbeddings:
    """Embed pool items `indices` (a contiguous range): images through `embedders`, and/or rows of a
    file; vectors are stored as `dtype` (float16 or float32)."""
    arrays: dict[str, np.ndarray] = {
        "valid": np.ones(len(indices), dtype=bool),
        "content_hashes": np.zeros(len(indices), dtype=HASH_DTYPE),
        "pixel_counts": np.zeros(len(indices), dtype=np.int64),
    }
    skipped: Counter[str] = Counter()
    if pool is not None:
        skipped = _embed_images(pool, indices, embedders, batch_size, num_workers, arrays, dtype)
    if embeddings_file:
        rows, file_valid = _file_rows(embeddings_file, pool, indices, dtype)
        rows[~arrays["valid"]] = 0
        arrays[MAIN] = rows
        arrays["valid"] &= file_valid
    return SliceEmbeddings(indices.start, arrays, dict(skipped))


def _embed_images(pool: ImagePool, indices: range, embedders: dict[str, Embedder], batch_size: int,
                  num_workers: int, arrays: dict[str, np.ndarray], dtype: str) -> Counter[str]:
    names = list(embedders)
    dataset = _PoolImages(pool, indices, [embedders[name].image_size for name in names])
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    for name in names:
        arrays[name] = np.zeros((len(indices), embedders[name].dim), dtype=dtype)
    skipped: Counter[str] = Counter()
    done = 0
    for images, ok, digests, pixel_counts, reasons in progress(loader, "embedding", total=len(loader)):
        n = len(ok)
        for name, batch in zip(names, images):
            # the whole batch goes through the model (unreadable rows zeroed after): batches never change shape
            vectors = embedders[name](batch)
            vectors[~ok] = 0
            arrays[name][done:done + n] = vectors.numpy()
        arrays["valid"][done:done + n] = ok.numpy()
        arrays["content_hashes"][done:done + n] = [d.encode() for d in digests]
        arrays["pixel_counts"][done:done + n] = pixel_counts.numpy()
        skipped.update(r for r in reasons if r)
        done += n
    return skipped


def _file_rows(embeddings_file: str, pool: ImagePool | None, indices: range, dtype: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """Rows `indices` of the embeddings file, L2-normalised to `dtype`, and which have a finite non-zero norm."""
    x = load_embeddings_file(embeddings_file, len(pool) if pool is not None else None)
    rows = np.zeros((len(indices), x.shape[1]), dtype=dtype)
    valid = np.zeros(len(indices), dtype=bool)
    for lo in range(0, len(indices), FILE_CHUNK_ROWS):
        block = np.asarray(x[indices.start + lo:min(indices.start + lo + FILE_CHUNK_ROWS, indices.stop)],
                           dtype=np.float32)
        norms = np.linalg.norm(block, axis=1)
        ok = np.isfinite(norms) & (norms > 0)
        rows[lo:lo + len(block)][ok] = block[ok] / norms[ok, None]
        valid[lo:lo + len(block)] = ok
    return rows, valid


def load_embeddings_file(path: str | Path, n_items: int | None) -> np.ndarray:
    """A memory-mapped (N, D) float array, checked against the pool size when known."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"embeddings file {path} does not exist; give an (N, D) .npy file")
    try:
        x = np.load(path, mmap_mode="r")
    except ValueError as err:
        raise DataError(f"{path} is not a readable .npy array: {err}") from None
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path} must hold an (N, D) float array; got {x.dtype} of shape {x.shape}")
    if n_items is not None and x.shape[0] != n_items:
        raise DataError(f"{path} has {x.shape[0]} rows but the pool has {n_items} images; row i must embed "
                        "pool item i")
    return x


def save_slice(directory: Path, result: SliceEmbeddings) -> None:
    """Write the slice's arrays into `directory` (the caller makes the folder atomic)."""
    for name, array in result.arrays.items():
        with atomic_path(directory / f"{name}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, array)


def list_slices(slice_dirs: Sequence[Path], out_dir: Path) -> dict[str, int]:
    """Make the slices' row-ranged arrays the stage's output: `out_dir/rows.json` lists them in row
    order (read with `store.RowStore.open(out_dir, name)`); nothing is copied."""
    names = sorted(p.stem for p in slice_dirs[0].glob("*.npy"))
    for d in slice_dirs[1:]:
        if sorted(p.stem for p in d.glob("*.npy")) != names:
            raise DataError(f"embedding slice {d} holds other arrays than {slice_dirs[0]} ({names}); rerun it")
    stores = {name: RowStore([d / f"{name}.npy" for d in slice_dirs]) for name in names}
    n_items = len(stores["valid"])
    if any(len(store) != n_items for store in stores.values()):
        raise DataError(f"the embedding slices in {out_dir} hold arrays of different lengths; rerun them")
    write_parts_listing(out_dir, slice_dirs, n_items)
    counts = {"items": n_items, "valid": int(np.asarray(stores["valid"]).sum())}
    for name in (MAIN, COPY):
        if name in stores:
            counts[f"{name}_dim"] = int(stores[name].shape[1])
    return counts


def embed_reference_set(path: str | Path, backbone: str, image_size: int, cfg: EmbedConfig) -> np.ndarray:
    """Embeddings of a seed or evaluation set: an (N, D) .npy file as is, or a pool of images embedded by
    `backbone` at `image_size` (the readable images only)."""
    path = Path(path)
    if path.suffix == ".npy":
        return load_embeddings_file(path, None)
    if not backbone:
        raise ConfigError(f"reference set {path} is a pool of images, but this curation has no image embedder "
                          "for it (it starts from curation.embed.embeddings_file); give its embeddings as .npy")
    pool = open_pool(path)
    embedder = build_embedder(backbone, image_size, cfg)
    result = embed_slice(pool, range(len(pool)), {MAIN: embedder}, "", cfg.batch_size, cfg.num_workers, cfg.dtype)
    return result.arrays[MAIN][result.arrays["valid"]]
