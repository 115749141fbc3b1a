"""Per-item arrays larger than memory: row-ranged `.npy` parts read through short-lived memory maps.

The embed stage's slices each write the rows of their own items (`embeddings.npy`, `valid.npy`,
... in one folder per slice); the merge lists those folders in `rows.json` instead of copying
them into one file. `RowStore` reads such a set of parts as one (N, ...) array: a slice or an
index array maps just the byte range of the parts it touches, copies the rows out and unmaps
them, so a process holds only the rows it asked for, and the file pages it read stay in the page
cache rather than in its resident memory. `RowSubset` is a lazy `x[index]` over any such array
(the dedup survivors of a store, for instance).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dinoscale.errors import DataError
from dinoscale.utils.io import read_json, write_json

PARTS_FILE = "rows.json"
FINGERPRINT_ROWS = 64


@dataclass(frozen=True)
class _Part:
    path: Path
    start: int  # first row of the whole store held by this part
    stop: int
    offset: int  # byte offset of the array data in the file


class RowStore:
    """A read-only (N, ...) array made of `.npy` files holding consecutive row ranges."""

    def __init__(self, files: Sequence[str | Path]):
        parts, start, dtype, tail = [], 0, None, None
        for path in map(Path, files):
            if not path.is_file():
                raise DataError(f"row store part {path} is missing; rerun the stage that writes it")
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, part_dtype = read_header(f)
                offset = f.tell()
            if fortran or (dtype is not None and (part_dtype != dtype or shape[1:] != tail)):
                raise DataError(f"row store part {path} holds {part_dtype} rows of shape {shape[1:]} "
                                f"(fortran order {fortran}); the parts before it hold {dtype} rows of shape {tail}")
            dtype, tail = part_dtype, shape[1:]
            parts.append(_Part(path, start, start + shape[0], offset))
            start += shape[0]
        if not parts:
            raise DataError("a row store needs at least one part")
        self.parts = parts
        self.dtype = dtype
        self.shape = (start, *tail)
        self._starts = np.array([p.start for p in parts[1:]], dtype=np.int64)

    @classmethod
    def open(cls, directory: str | Path, name: str) -> "RowStore":
        """Array `name` of the parts listed in `directory/rows.json`."""
        directory = Path(directory)
        if not (directory / PARTS_FILE).is_file():
            raise DataError(f"no row store in '{directory}' ({PARTS_FILE} missing); run the stage that writes it")
        listing = read_json(directory / PARTS_FILE)
        store = cls([directory / part["dir"] / f"{name}.npy" for part in listing["parts"]])
        if store.shape[0] != listing["n_items"]:
            raise DataError(f"{directory}: the parts of '{name}' hold {store.shape[0]} rows, {PARTS_FILE} says "
                            f"{listing['n_items']}; rerun the stage that writes them")
        return store

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            row = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= row < len(self):
                raise IndexError(f"row {key} is out of range for a store of {len(self)} rows")
            return self._read_range(row, row + 1)[0]
        if isinstance(key, slice):
            rows = range(*key.indices(len(self)))
            if rows.step == 1:
                return self._read_range(rows.start, max(rows.start, rows.stop))
            key = np.arange(rows.start, rows.stop, rows.step)
        index = np.asarray(key)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
            raise IndexError("a row store takes an int, a slice, or a 1-D integer or boolean index")
        index = np.where(index < 0, index + len(self), index)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row indices out of range for a store of {len(self)} rows")
        order = np.argsort(index, kind="stable")
        ordered = index[order]
        out = np.empty((len(index), *self.shape[1:]), dtype=self.dtype)
        bounds = np.searchsorted(ordered, [p.start for p in self.parts] + [len(self)])
        for part, lo, hi in zip(self.parts, bounds[:-1], bounds[1:]):
            if hi > lo:
                first, last = int(ordered[lo]), int(ordered[hi - 1]) + 1
                out[order[lo:hi]] = self._map(part, first, last)[ordered[lo:hi] - first]
        return out

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        first = int(np.searchsorted(self._starts, start, side="right"))
        for part in self.parts[first:]:
            if part.start >= stop:
                break
            lo, hi = max(start, part.start), min(stop, part.stop)
            out[lo - start:hi - start] = self._map(part, lo, hi)
        return out

    def _map(self, part: _Part, start: int, stop: int) -> np.memmap:
        """Rows start:stop of the store, mapped from `part` (unmapped once the caller drops it)."""
        row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
        return np.memmap(part.path, dtype=self.dtype, mode="r", shape=(stop - start, *self.shape[1:]),
                         offset=part.offset + (start - part.start) * row_bytes)


def write_parts_listing(directory: str | Path, part_dirs: Sequence[str | Path], n_items: int) -> None:
    """Write `directory/rows.json`: the part folders (relative to `directory`), in row order."""
    directory = Path(directory)
    write_json(directory / PARTS_FILE, {"n_items": n_items,
                                        "parts": [{"dir": str(Path(d).relative_to(directory))} for d in part_dirs]})


class RowSubset:
    """`x[index]` for an (N, ...) array-like `x` without reading it: rows are fetched on indexing."""

    def __init__(self, x: Any, index: np.ndarray):
        self.x, self.index = x, np.asarray(index, dtype=np.int64)
        self.shape = (len(self.index), *x.shape[1:])
        self.dtype = x.dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.x[self.index[key]]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        rows = np.asarray(self.x[self.index])
        return rows if dtype is None else rows.astype(dtype)


def fingerprint_rows(n_rows: int) -> np.ndarray:
    """Up to 64 evenly spaced rows of n_rows, the ones a fingerprint reads."""
    return np.unique(np.linspace(0, n_rows - 1, num=min(FINGERPRINT_ROWS, n_rows)).astype(np.int64))


def data_fingerprint(x: Any) -> str:
    """Shape, dtype and the bytes of up to 64 evenly spaced rows: cheap even for a store on disk."""
    rows = fingerprint_rows(x.shape[0])
    digest = hashlib.sha256(f"{tuple(x.shape)}{np.dtype(x.dtype)}".encode())
    digest.update(np.ascontiguousarray(x[rows]).tobytes())
    return digest.hexdigest()[:16]
