"""Image pools: one read-only, indexed view over an image folder, a text file of paths, a CSV
file of paths (with labels), or webdataset tar shards in the layout img2dataset writes
(`KEY.jpg|png|webp` + `KEY.json|txt`).

Item i is the same image on every read, with a stable string key; row i of every array a
later stage writes belongs to item i. Decoding never stops a run: an image that cannot be
read as RGB is skipped, counted by reason and its key logged.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dinoscale.errors import DataError
from dinoscale.utils.logging import get_logger

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 64_000_000  # larger images are treated as decompression bombs
DEFAULT_MIN_SIDE = 8

log = get_logger(__name__)


@dataclass
class DecodeResult:
    image: Image.Image | None
    skip_reason: str | None = None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE) -> DecodeResult:
    """Decode bytes to an upright RGB image, or say why it must be skipped."""
    if not data:
        return DecodeResult(None, "empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                return DecodeResult(None, "too_large")
            if min(width, height) < min_side:
                return DecodeResult(None, "too_small")
            img.load()
            img = ImageOps.exif_transpose(img)
            return DecodeResult(_to_rgb(img))
    except UnidentifiedImageError:
        return DecodeResult(None, "not_an_image")
    except Image.DecompressionBombError:
        return DecodeResult(None, "too_large")
    except (OSError, SyntaxError, ValueError, EOFError):
        return DecodeResult(None, "truncated_or_corrupt")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: keep the dynamic range instead of clipping at 255
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


@dataclass
class PoolSummary:
    total: int
    readable: int
    skipped: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        skips = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.total} items, {self.readable} readable, skipped: {skips}"


class StringArray(Sequence[str]):
    """An immutable sequence of str held as one UTF-8 byte buffer plus offsets (numpy arrays).

    A list of 10^8 str objects costs several GB per data-loader worker: every read touches an
    object's reference count, so forked workers copy the pages they read. Here there is no Python
    object per item; items are decoded on access.
    """

    def __init__(self, items: Iterable[str]):
        encoded = [item.encode("utf-8") for item in items]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(item) for item in encoded], out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        index = int(index) % n
        return self._buffer[self._offsets[index]:self._offsets[index + 1]].tobytes().decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        data = self._buffer.tobytes()
        for start, stop in zip(self._offsets[:-1].tolist(), self._offsets[1:].tolist()):
            yield data[start:stop].decode("utf-8")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StringArray):
            return np.array_equal(self._offsets, other._offsets) and np.array_equal(self._buffer, other._buffer)
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # mutable-looking equality, like list

    def __repr__(self) -> str:
        head = ", ".join(repr(item) for item in self[:3])
        return f"StringArray([{head}{', ...' if len(self) > 3 else ''}], {len(self)} items)"


class PathArray(Sequence[Path]):
    """Paths `root / name` (or `name` without a root) for names kept in a StringArray."""

    def __init__(self, names: Iterable[str], root: Path | None = None):
        self.names, self.root = StringArray(names), root

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        name = self.names[index]
        return Path(name) if self.root is None else self.root / name


class ImagePool:
    """Base class: subclasses provide `keys`, `_read(i)` and optionally labels."""

    keys: Sequence[str]
    labels: list[int] | None = None
    class_names: list[str] | None = None

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE):
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.skipped: Counter[str] = Counter()
        self._logged_skips: set[int] = set()  # each skipped item is logged once, not once per epoch

    def __len__(self) -> int:
        return len(self.keys)

    def _read(self, index: int) -> bytes:
        raise NotImplementedError

    def read_bytes(self, index: int) -> bytes:
        try:
            return self._read(index)
        except OSError as err:
            log.warning("cannot read %s: %s", self.keys[index], err)
            return b""

    def load(self, index: int) -> Image.Image | None:
        """The RGB image of item `index`, or None when it is skipped (counted and logged)."""
        result = decode_image(self.read_bytes(index), self.max_pixels, self.min_side)
        if result.image is None:
            self.skipped[result.skip_reason] += 1
            if index not in self._logged_skips:
                self._logged_skips.add(index)
                log.info("skipping %s: %s", self.keys[index], result.skip_reason)
        return result.image

    def content_hash(self, index: int) -> str:
        return hashlib.sha256(self.read_bytes(index)).hexdigest()

    def slice(self, worker: int, n_workers: int) -> range:
        """Worker `worker` of `n_workers` gets this disjoint contiguous range of items."""
        if not 0 <= worker < n_workers:
            raise DataError(f"slice {worker}/{n_workers} is invalid: need 0 <= i < n")
        n = len(self)
        return range(worker * n // n_workers, (worker + 1) * n // n_workers)

    def scan(self, indices: Sequence[int] | None = None) -> PoolSummary:
        """Decode every item once and count the skips."""
        before = Counter(self.skipped)
        indices = range(len(self)) if indices is None else indices
        readable = sum(self.load(i) is not None for i in indices)
        return PoolSummary(len(indices), readable, dict(self.skipped - before))

    def summary(self) -> PoolSummary:
        return PoolSummary(len(self), len(self) - sum(self.skipped.values()), dict(self.skipped))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _labels_from_keys(keys: list[str]) -> tuple[list[int] | None, list[str] | None]:
    """Class sub-folders give labels when every key lies in one."""
    if not keys or any("/" not in k for k in keys):
        return None, None
    return _labels_from_names([k.split("/", 1)[0] for k in keys])


def _labels_from_names(names: Sequence[str]) -> tuple[list[int], list[str]]:
    """Integer labels and the sorted class names (numbers in numeric order) of per-item class names."""
    classes = sorted(set(names), key=_natural_key)
    index = {name: i for i, name in enumerate(classes)}
    return [index[name] for name in names], classes


class FolderPool(ImagePool):
    """Every image file below `root`, sorted by relative path; class sub-folders give labels."""

    def __init__(self, root: str | os.PathLike, **kwargs):
        super().__init__(**kwargs)
        self.root = Path(root)
        relative = sorted(p.relative_to(self.root) for p in self.root.rglob("*") if p.is_file() and _is_image(p))
        if not relative:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}")
        self.paths = PathArray((p.as_posix() for p in relative), self.root)
        keys = [p.with_suffix("").as_posix() for p in relative]
        self.labels, self.class_names = _labels_from_keys(keys)
        self.keys = StringArray(keys)

    def _read(self, index: int) -> bytes:
        return self.paths[index].read_bytes()


class PathListPool(ImagePool):
    """A list of image paths (relative paths are relative to the list file): a text file with one path
    per line, where images in more than one folder take the folder's name as their class (the
    ImageNet layout), or a CSV file with a header naming a `path` column and optionally a `label` column."""

    def __init__(self, list_file: str | os.PathLike, **kwargs):
        super().__init__(**kwargs)
        list_file = Path(list_file)
        base = list_file.parent
        if list_file.suffix == ".csv":
            names, class_names = _read_csv_list(list_file)
        else:
            names, class_names = _read_text_list(list_file), None
        paths = [Path(name) if Path(name).is_absolute() else base / name for name in names]
        if not paths:
            raise DataError(f"{list_file} lists no image paths")
        keys = [_key_for_path(p, base) for p in paths]
        if len(set(keys)) != len(keys):
            raise DataError(f"{list_file} lists the same image key twice; keys must be unique")
        if class_names is None and len({p.parent for p in paths}) > 1:
            class_names = [p.parent.name for p in paths]
        if class_names is not None:
            self.labels, self.class_names = _labels_from_names(class_names)
        self.paths = PathArray(str(p) for p in paths)
        self.keys = StringArray(keys)

    def _read(self, index: int) -> bytes:
        return self.paths[index].read_bytes()


def _read_text_list(list_file: Path) -> list[str]:
    lines = [line.strip() for line in list_file.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _read_csv_list(list_file: Path) -> tuple[list[str], list[str] | None]:
    """The `path` column of a CSV file, and its `label` column when it has one."""
    with open(list_file, newline="") as f:
        reader = csv.DictReader(f)
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        if "path" not in columns:
            raise DataError(f"{list_file}: the first line must name the columns, one of them `path` (and `label` for "
                            f"labelled images); found {reader.fieldnames}")
        rows = list(reader)
    wanted = ["path", "label"] if "label" in columns else ["path"]
    cells = [[(row[columns[name]] or "").strip() for name in wanted] for row in rows]
    for line, values in enumerate(cells, start=2):
        for name, value in zip(wanted, values):
            if not value:
                raise DataError(f"{list_file}:{line} has an empty {name}; fill it in or remove the row")
    paths = [values[0] for values in cells]
    return paths, [values[1] for values in cells] if "label" in columns else None


def _key_for_path(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).with_suffix("").as_posix()
    except ValueError:
        return path.with_suffix("").as_posix().lstrip("/")


class TarShardPool(ImagePool):
    """webdataset tar shards (img2dataset layout): random access through a member index.

    Labels come from `KEY.cls` or the `label` field of `KEY.json` when every item has one.
    """

    def __init__(self, shards: Sequence[str | os.PathLike], **kwargs):
        super().__init__(**kwargs)
        self.shards = [Path(s) for s in shards]
        if not self.shards:
            raise DataError("no tar shards given")
        keys: list[str] = []
        members: list[tuple[int, int, int]] = []  # shard, offset of the data, size
        raw_labels: list[str | None] = []
        for shard_id, shard in enumerate(self.shards):
            for key, member, label in _index_shard(shard):
                keys.append(key)
                members.append((shard_id, member.offset_data, member.size))
                raw_labels.append(label)
        if not keys:
            raise DataError(f"the tar shards ({self.shards[0]} ...) hold no images")
        self.keys = StringArray(keys)
        self._members = np.array(members, dtype=np.int64)  # one row per item: no Python object per item
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()
        if all(lbl is not None for lbl in raw_labels):
            self.labels, self.class_names = _labels_from_names(raw_labels)

    def _read(self, index: int) -> bytes:
        if os.getpid() != self._pid:  # a forked worker must not share file offsets
            self._handles, self._pid = {}, os.getpid()
        shard, offset, size = self._members[index].tolist()
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = open(self.shards[shard], "rb")
        handle.seek(offset)
        return handle.read(size)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def _natural_key(text: str) -> tuple:
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def _index_shard(shard: Path) -> Iterator[tuple[str, tarfile.TarInfo, str | None]]:
    try:
        with tarfile.open(shard, "r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            by_key: dict[str, dict[str, tarfile.TarInfo]] = {}
            for m in members:
                stem, dot, ext = m.name.rpartition("/")[2].partition(".")
                prefix = m.name.rpartition("/")[0]
                key = f"{prefix}/{stem}" if prefix else stem
                by_key.setdefault(key, {})[ext.lower()] = m
            for key, parts in by_key.items():
                image = next((parts[e.lstrip(".")] for e in IMAGE_EXTENSIONS if e.lstrip(".") in parts), None)
                if image is None:
                    continue
                yield key, image, _label_of(tar, parts)
    except tarfile.TarError as err:
        raise DataError(f"{shard} is not a readable tar shard: {err}") from None


def _label_of(tar: tarfile.TarFile, parts: dict[str, tarfile.TarInfo]) -> str | None:
    if "cls" in parts:
        return tar.extractfile(parts["cls"]).read().decode().strip()
    if "json" in parts:
        try:
            meta = json.loads(tar.extractfile(parts["json"]).read())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if isinstance(meta, dict) and meta.get("label") is not None:
            return str(meta["label"])
    return None


def open_pool(path: str | os.PathLike | Sequence[str], **kwargs) -> ImagePool:
    """Open an image folder, a text or CSV file of image paths, a tar shard, a folder of tar shards,
    or a list of tar shards."""
    if isinstance(path, (list, tuple)):
        return TarShardPool(path, **kwargs)
    path = Path(path)
    if not path.exists():
        raise DataError(f"pool path {path} does not exist; give an image folder, a .txt list of paths or tar shards")
    if path.is_file():
        if path.suffix == ".tar":
            return TarShardPool([path], **kwargs)
        if path.suffix in (".txt", ".lst", ".list", ".csv"):
            return PathListPool(path, **kwargs)
        raise DataError(f"{path} is neither a .tar shard, a .txt list of image paths nor a .csv file of them")
    shards = sorted(path.glob("*.tar"))
    if shards and not any(_is_image(p) for p in path.iterdir()):
        return TarShardPool(shards, **kwargs)
    return FolderPool(path, **kwargs)
