"""The points a k-means fit works on, dealt out to the ranks in fixed blocks (`collective`).

`Points.of(x)` is every row of an (N, D) array-like that every rank can read (a row store or a
memory map on a shared file system, or a small array every rank holds, such as the centroids of
the level below): each rank reads only its own blocks, one at a time. A subset of them (a
training sample, the points a resampling step keeps) is renumbered in the original order and
dealt out afresh in blocks of its own, the rows moving between ranks (`select`), so that a fit on
it is cut into the same blocks on any world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch

from dinoscale.curation.collective import Comm, block_range, blocks_of

T = TypeVar("T")
MEANS_CHUNK_ROWS = 2048  # a chunk's scaled copy stays in cache: 3x faster sums than 65536 rows


@dataclass
class Points:
    """This rank's rows of a set of `n` points of dimension `dim`: global rows `rows`, read from
    `source` (row r of the set is source[r - first])."""

    source: Any
    n: int
    dim: int
    rows: range
    first: int = 0
    comm: Comm = field(default_factory=Comm)

    @classmethod
    def of(cls, x: Any, comm: Comm | None = None) -> "Points":
        """All rows of `x` (which every rank can read); this rank takes its blocks."""
        comm = comm or Comm.current()
        return cls(x, x.shape[0], x.shape[1], comm.rows(x.shape[0]), 0, comm)

    @property
    def n_local(self) -> int:
        return len(self.rows)

    def blocks(self) -> list[range]:
        return blocks_of(self.rows)

    def blocks_per_rank(self) -> list[int]:
        """How many blocks each rank holds (the same list on every rank)."""
        return [len(blocks_of(block_range(self.n, r, self.comm.world))) for r in range(self.comm.world)]

    def read(self, rows: range) -> np.ndarray:
        """Rows `rows` (a part of this rank's) as contiguous float32."""
        return np.ascontiguousarray(self.source[rows.start - self.first:rows.stop - self.first], dtype=np.float32)

    def read_blocks(self) -> Iterator[tuple[slice, np.ndarray]]:
        """(position within this rank's rows, float32 rows) for each of this rank's blocks in turn."""
        for block in self.blocks():
            yield slice(block.start - self.rows.start, block.stop - self.rows.start), self.read(block)

    def local(self) -> np.ndarray:
        """All of this rank's rows as one float32 array."""
        return self.read(self.rows)

    @cached_property
    def max_abs(self) -> float:
        """The largest absolute coordinate over all ranks' rows."""
        local = max((float(np.abs(rows).max()) for _, rows in self.read_blocks() if len(rows)), default=0.0)
        return float(self.comm.max(np.array([local]))[0])

    def select(self, keep: np.ndarray) -> "Points":
        """The rows of every rank whose `keep` (over this rank's rows) is set, as a new set in the
        same order, dealt out in fresh blocks."""
        kept = np.concatenate([np.zeros((0, self.dim), dtype=np.float32)] +
                              [rows[keep[where]] for where, rows in self.read_blocks() if keep[where].any()])
        if self.comm.world == 1:
            return Points(kept, len(kept), self.dim, range(len(kept)), 0, self.comm)
        counts = self.comm.concat(np.array([len(kept)], dtype=np.int64), [1] * self.comm.world)
        n, start = int(counts.sum()), int(counts[:self.comm.rank].sum())
        owner_starts = [block_range(n, r, self.comm.world).start for r in range(1, self.comm.world)]
        cuts = np.clip(np.array(owner_starts, dtype=np.int64) - start, 0, len(kept))
        received = self.comm.exchange(np.split(kept, cuts))
        rows = self.comm.rows(n)
        return Points(np.concatenate(received), n, self.dim, rows, rows.start, self.comm)

    def take(self, positions: np.ndarray) -> "Points":
        """The rows at sorted global `positions` (the same on every rank), as a new set."""
        lo, hi = np.searchsorted(positions, [self.rows.start, self.rows.stop])
        keep = np.zeros(self.n_local, dtype=bool)
        keep[positions[lo:hi] - self.rows.start] = True
        return self.select(keep)

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """Rows at global `positions` (any order, the same on every rank) as float32, on every rank."""
        positions = np.asarray(positions, dtype=np.int64)
        mine = np.flatnonzero((positions >= self.rows.start) & (positions < self.rows.stop))
        rows = np.asarray(self.source[positions[mine] - self.first], dtype=np.float32).reshape(len(mine), self.dim)
        if self.comm.world == 1:
            return rows
        # positions travel with their rows: float64 holds any row index exactly
        packed = self.comm.concat(np.concatenate([mine[:, None].astype(np.float64), rows.astype(np.float64)], 1))
        out = np.empty((len(positions), self.dim), dtype=np.float32)
        out[packed[:, 0].astype(np.int64)] = packed[:, 1:]
        return out

    def sole_holder(self) -> int | None:
        """The rank that holds all the rows when there are several ranks and one holds them all."""
        holders = np.flatnonzero(self.blocks_per_rank())
        return int(holders[0]) if self.comm.world > 1 and len(holders) == 1 else None

    def on_sole_holder(self, compute: Callable[["Points"], T], rng: np.random.Generator) -> T:
        """`compute(points)` run by the sole holder on its rows as a world of its own (no exchange
        per step), its result sent to every rank, whose generator goes on from the holder's state."""
        holder = self.sole_holder()
        result = compute(replace(self, comm=Comm())) if self.comm.rank == holder else None
        result, state = self.comm.broadcast((result, rng.bit_generator.state), src=holder)
        rng.bit_generator.state = state
        return result

    def fixed_point_shift(self) -> int:
        """s such that the sum of any of the rows, scaled by 2^s and rounded, fits in an int64."""
        if self.max_abs == 0:
            return 0
        exponent = math.frexp(self.max_abs)[1]  # max_abs < 2^exponent
        return min(62 - exponent - math.ceil(math.log2(self.n + 1)), 1000)

    def mean(self) -> np.ndarray:
        """The mean of all ranks' rows (float64), the same on every rank."""
        sums = ClusterSums(self, 1)
        for _, rows in self.read_blocks():
            sums.add(rows, np.zeros(len(rows), dtype=np.int64))
        return sums.means(np.zeros((1, self.dim)))[0]


class ClusterSums:
    """Per-cluster sums and counts of points, in fixed point: exact int64 sums of the coordinates
    times 2^shift, rounded (the shift is one per fit, `Points.fixed_point_shift`)."""

    def __init__(self, points: "Points", n_clusters: int):
        self.points = points
        self.shift = points.fixed_point_shift()
        self.sums = torch.zeros((n_clusters, points.dim), dtype=torch.int64)
        self.counts = np.zeros(n_clusters, dtype=np.int64)

    def add(self, rows: np.ndarray, assignment: np.ndarray, chunk_rows: int = MEANS_CHUNK_ROWS) -> None:
        scale = 2.0 ** self.shift
        for lo in range(0, len(rows), chunk_rows):
            scaled = torch.from_numpy(np.asarray(rows[lo:lo + chunk_rows], dtype=np.float64) * scale).round_()
            self.sums.index_add_(0, torch.from_numpy(assignment[lo:lo + chunk_rows]), scaled.long())
        self.counts += np.bincount(assignment, minlength=len(self.counts))

    def means(self, fallback: np.ndarray) -> np.ndarray:
        """Mean of each cluster's points over all ranks (float64); empty clusters keep `fallback`."""
        # one all-reduce: the counts ride along as a last column
        reduced = self.points.comm.sum(np.concatenate([self.sums.numpy(), self.counts[:, None]], axis=1))
        sums, counts = reduced[:, :-1], reduced[:, -1]
        means = np.array(fallback, dtype=np.float64)
        filled = counts > 0
        means[filled] = sums[filled].astype(np.float64) * 2.0 ** -self.shift / counts[filled, None]
        return means


def as_points(x: Any) -> Points:
    """`x` itself when it is a Points, else all rows of the array `x`."""
    return x if isinstance(x, Points) else Points.of(x)

