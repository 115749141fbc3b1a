"""One distributed code path: a single process is a process group of world size 1; torchrun and
SLURM (`SLURM_PROCID`, `SLURM_NTASKS`, ... when not under torchrun) are both recognised.
NCCL on CUDA, gloo on CPU, one device per rank."""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST", os.environ.get("SLURM_NODELIST", "localhost"))
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]


def slurm_port(job_id: str) -> int:
    """A port derived from the job id, so every task of a job picks the same one."""
    return 20000 + int("".join(c for c in job_id if c.isdigit()) or 0) % 20000


def env_from_slurm() -> dict[str, str]:
    """torch.distributed's environment variables from a SLURM task's own variables."""
    job_id = os.environ.get("SLURM_JOB_ID", "0")  # unique per array task too, so co-located tasks differ
    return {
        "RANK": os.environ["SLURM_PROCID"],
        "WORLD_SIZE": os.environ.get("SLURM_NTASKS", "1"),
        "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": os.environ.get("MASTER_ADDR") or _first_slurm_host(),
        "MASTER_PORT": os.environ.get("MASTER_PORT") or str(slurm_port(job_id)),
    }


def init_distributed(timeout: timedelta | None = None) -> DistInfo:
    """Initialise the process group: the ranks torchrun or SLURM launched, else a world of one
    (an in-process store; no port is opened). `timeout` bounds every collective (None: torch's
    default)."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        os.environ.update(env_from_slurm())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = dist.HashStore() if world_size == 1 else None
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, store=store, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, device)


@contextlib.contextmanager
def process_group(timeout: timedelta | None = None) -> Iterator[DistInfo]:
    """`init_distributed` for the duration of the block; a process group it started is destroyed
    at the end (one that existed before is left alone)."""
    started = not dist.is_initialized()
    info = init_distributed(timeout)
    try:
        yield info
    finally:
        if started:
            # FSDP modules sit in reference cycles that hold the group: free them now, not in the
            # interpreter's finalisation, where gloo's threads can abort the process
            gc.collect()
            dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
