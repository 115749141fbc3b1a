"""What the curation stages exchange between ranks, and how rows are dealt to them.

Every collective stage (dedup, k-means, sampling) must give the same result on 1 or N ranks. Rows
are therefore cut into fixed blocks of `BLOCK_ROWS` (the last one shorter) that do not depend on
the world size, and each rank owns a contiguous run of whole blocks (`block_range`). Whatever a
stage computes per block is the same on any world size; what it reduces over blocks is exchanged
so that the reduction's result does not depend on where the rank boundaries fall either:
integer sums (exact in any order), maxima, or per-block values gathered in block order
(`concat`: ranks own increasing block ranges, so rank order is block order) and then reduced in
that fixed order on every rank.

A single process is a world of one: every collective returns its input and nothing is sent.
Under torchrun or a multi-task SLURM job the default process group carries the exchanges
(gloo on CPU; NCCL on GPU, where the tensors travel through the rank's GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from dinoscale.errors import DataError

BLOCK_ROWS = 16384  # read at call time: tests shrink it to cut small data into many blocks


def block_range(n_rows: int, rank: int, world: int, block_rows: int | None = None) -> range:
    """Rows of `rank` out of `world`: a contiguous run of whole blocks, block counts as even as possible."""
    block_rows = block_rows or BLOCK_ROWS
    n_blocks = -(-n_rows // block_rows)
    first, last = rank * n_blocks // world, (rank + 1) * n_blocks // world
    return range(min(first * block_rows, n_rows), min(last * block_rows, n_rows))


def blocks_of(rows: range, block_rows: int | None = None) -> list[range]:
    """The fixed blocks that make up `rows` (which starts on a block boundary)."""
    block_rows = block_rows or BLOCK_ROWS
    return [range(lo, min(lo + block_rows, rows.stop)) for lo in range(rows.start, rows.stop, block_rows)]


@dataclass(frozen=True)
class Comm:
    """This process's place in the world, and the exchanges between ranks."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where tensors go through the process group

    @classmethod
    def current(cls) -> "Comm":
        """The default process group, or a world of one when there is none."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls()
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, n_rows: int, block_rows: int | None = None) -> range:
        """This rank's rows of a set of `n_rows`."""
        return block_range(n_rows, self.rank, self.world, block_rows)

    # ------------------------------------------------------------------ reductions
    def sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks (exact, hence order-free, for integers)."""
        return self._all_reduce(array, dist.ReduceOp.SUM)

    def max(self, array: np.ndarray) -> np.ndarray:
        return self._all_reduce(array, dist.ReduceOp.MAX)

    def min(self, array: np.ndarray) -> np.ndarray:
        return self._all_reduce(array, dist.ReduceOp.MIN)

    def _all_reduce(self, array: np.ndarray, op: dist.ReduceOp) -> np.ndarray:
        array = np.asarray(array)
        if self.world == 1:
            return array
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device, copy=True)
        dist.all_reduce(tensor, op=op)
        return tensor.cpu().numpy()

    # ------------------------------------------------------------------ gathers and exchanges
    def concat(self, array: np.ndarray, lengths: Sequence[int] | None = None) -> np.ndarray:
        """Every rank's `array` joined along axis 0 in rank order, on every rank. Their lengths may
        differ (pass them when every rank knows them, to save an exchange); trailing dimensions and
        dtype must agree."""
        array = np.ascontiguousarray(array)
        if self.world == 1:
            return array
        if lengths is None:
            lengths = self.concat(np.array([len(array)], dtype=np.int64), [1] * self.world).tolist()
        row_bytes = array.dtype.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
        longest = max(lengths) * row_bytes
        if longest == 0:
            return np.zeros((sum(lengths), *array.shape[1:]), dtype=array.dtype)
        buffer = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        buffer[:array.nbytes] = torch.from_numpy(array.reshape(-1).view(np.uint8)).to(self.device)
        gathered = [torch.empty_like(buffer) for _ in range(self.world)]
        dist.all_gather(gathered, buffer)
        parts = [g[:n * row_bytes].cpu().numpy() for g, n in zip(gathered, lengths)]
        return np.concatenate(parts).view(array.dtype).reshape(sum(lengths), *array.shape[1:])

    def share(self, array: np.ndarray, src: int, n_rows: int) -> np.ndarray:
        """Rank `src`'s `array` of `n_rows` rows on every rank. The other ranks pass an array of the
        same dtype and trailing dimensions (its rows are not sent): one broadcast, where `concat`
        with one non-empty rank would make every rank send a buffer of that size."""
        array = np.ascontiguousarray(array)
        if self.world == 1:
            return array
        row_bytes = array.dtype.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
        buffer = torch.empty(n_rows * row_bytes, dtype=torch.uint8, device=self.device)
        if self.rank == src:
            buffer.copy_(torch.from_numpy(array.reshape(-1).view(np.uint8)))
        dist.broadcast(buffer, src=src)
        return buffer.cpu().numpy().view(array.dtype).reshape(n_rows, *array.shape[1:])

    def gather(self, array: np.ndarray, dst: int) -> np.ndarray | None:
        """Every rank's `array` (the same shape on all) joined along axis 0 in rank order, on rank
        `dst` only (None on the others)."""
        array = np.ascontiguousarray(array)
        if self.world == 1:
            return array
        tensor = torch.from_numpy(array.reshape(-1).view(np.uint8)).to(self.device, copy=True)
        parts = [torch.empty_like(tensor) for _ in range(self.world)] if self.rank == dst else None
        dist.gather(tensor, parts, dst=dst)
        if parts is None:
            return None
        return np.concatenate([part.cpu().numpy() for part in parts]).view(array.dtype).reshape(
            self.world * len(array), *array.shape[1:])

    def exchange(self, parts: Sequence[np.ndarray]) -> list[np.ndarray]:
        """All-to-all: `parts[r]` goes to rank r; returns the part each rank sent here, by sender.
        Parts share dtype and trailing dimensions and may have any length."""
        if self.world == 1:
            return [np.ascontiguousarray(parts[0])]
        template = np.asarray(parts[0])
        row_bytes = template.dtype.itemsize * int(np.prod(template.shape[1:], dtype=np.int64))
        send_rows = np.array([len(p) for p in parts], dtype=np.int64)
        recv_rows = self.concat(send_rows, [self.world] * self.world).reshape(self.world, self.world)[:, self.rank]
        flat = np.concatenate([np.ascontiguousarray(p).reshape(-1).view(np.uint8) for p in parts])
        received = torch.empty(int(recv_rows.sum()) * row_bytes, dtype=torch.uint8, device=self.device)
        dist.all_to_all_single(received, torch.from_numpy(flat).to(self.device),
                               (recv_rows * row_bytes).tolist(), (send_rows * row_bytes).tolist())
        data = received.cpu().numpy().view(template.dtype).reshape(-1, *template.shape[1:])
        return np.split(data, np.cumsum(recv_rows)[:-1])

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """`obj` of rank `src` on every rank (a small picklable object)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.device)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def check_same(self, values: dict[str, Any], what: str, fix: str) -> None:
        """Raise DataError on every rank, before any work, unless all ranks see the same `values`."""
        if self.world == 1:
            return
        box: list[Any] = [None] * self.world
        dist.all_gather_object(box, values)
        differing = [r for r in range(self.world) if box[r] != box[0]]
        if differing:
            r = differing[0]
            keys = [k for k in values if box[r].get(k) != box[0].get(k)]
            seen = "; ".join(f"rank {q}: " + ", ".join(f"{k}={box[q].get(k)!r}" for k in keys) for q in (0, r))
            raise DataError(f"the ranks disagree on the {what} (ranks {differing} differ from rank 0 in "
                            f"{', '.join(keys)}: {seen}); {fix}")


def block_uniforms(rows: range, stream: int, block_rows: int | None = None) -> np.ndarray:
    """A uniform random number in [0, 1) per row of `rows` (this rank's), drawn block by block from
    generators seeded by (`stream`, block): the same number for the same row on any world size."""
    block_rows = block_rows or BLOCK_ROWS
    first_block = rows.start // block_rows
    return np.concatenate([np.zeros(0)] + [np.random.default_rng((stream, first_block + b)).random(len(block))
                                           for b, block in enumerate(blocks_of(rows, block_rows))])


def rank_within_groups(sorted_groups: np.ndarray) -> np.ndarray:
    """For a sorted array of group ids: the position of each element inside its group."""
    if len(sorted_groups) == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    sizes = np.diff(np.r_[starts, len(sorted_groups)])
    return np.arange(len(sorted_groups)) - np.repeat(starts, sizes)


def smallest_in_groups(groups: np.ndarray, keys: np.ndarray, quota: np.ndarray, first_row: int,
                       comm: Comm) -> np.ndarray:
    """Which of this rank's rows (global rows first_row, first_row + 1, ...; group `groups[i]`, key
    `keys[i]`) are among the `quota[g]` rows of their group g with the smallest keys over all
    ranks; equal keys go to the smaller row. Returns a bool mask over this rank's rows.

    One rank sorts. Several search each group's cut by bisection, first on the keys (through an
    order-preserving int64 image of their float64 bits), then, among rows whose key equals the
    cut, on the row number: one all-reduce of per-group counts a round, about 64 rounds, and rows
    outside the interval still searched drop out as it narrows."""
    if comm.world == 1:
        order = np.lexsort((keys, groups))
        picked = np.zeros(len(groups), dtype=bool)
        picked[order[rank_within_groups(groups[order]) < quota[groups[order]]]] = True
        return picked
    sortable = _sortable_bits(keys)
    size = comm.sum(np.bincount(groups, minlength=len(quota)))
    whole = quota >= size
    searching = ~whole & (quota > 0)
    cut = _bisect(groups, sortable, quota, searching, comm)
    below = sortable < cut[groups]
    picked = whole[groups] | (searching[groups] & below)
    # among the rows at the cut itself, those with the smallest row numbers fill the quota
    remaining = quota - comm.sum(np.bincount(groups[below], minlength=len(quota)))
    at_cut = np.flatnonzero(searching[groups] & (sortable == cut[groups]))
    rows = first_row + at_cut
    row_cut = _bisect(groups[at_cut], rows, remaining, searching, comm)
    picked[at_cut[rows <= row_cut[groups[at_cut]]]] = True
    return picked


def _sortable_bits(keys: np.ndarray) -> np.ndarray:
    """int64 numbers in the order of the float `keys` (taken as float64)."""
    bits = np.ascontiguousarray(keys, dtype=np.float64).view(np.int64)
    return np.where(bits < 0, bits ^ np.int64(0x7FFFFFFFFFFFFFFF), bits)


def _bisect(groups: np.ndarray, values: np.ndarray, quota: np.ndarray, searching: np.ndarray, comm: Comm
            ) -> np.ndarray:
    """Per group g where `searching`: the smallest v with at least quota[g] of the group's int64
    values (over all ranks) <= v; any value for the others."""
    n_groups = len(quota)
    low = np.full(n_groups, np.iinfo(np.int64).max)
    high = np.full(n_groups, np.iinfo(np.int64).min)
    np.minimum.at(low, groups, values)
    np.maximum.at(high, groups, values)
    low, high = comm.min(low), comm.max(high)
    low[~searching] = high[~searching]
    below = np.zeros(n_groups, dtype=np.int64)  # values under `low`, no longer looked at
    active = np.arange(len(groups))
    while (low < high).any():  # low and high are the same on every rank
        middle = (low >> 1) + (high >> 1) + (low & high & 1)  # floor((low + high) / 2) without overflow
        g, v = groups[active], values[active]
        counted = below + comm.sum(np.bincount(g[v <= middle[g]], minlength=n_groups))
        open_ = low < high
        enough = counted >= quota
        high = np.where(open_ & enough, middle, high)
        low = np.where(open_ & ~enough, middle + 1, low)
        below = np.where(open_ & ~enough, counted, below)
        active = active[(v >= low[g]) & (v <= high[g])]
    return high
