"""torch.distributed for all of dinoscale: one code path from one process to many nodes.

A single process is a process group of world size 1 (an in-process store, no port). torchrun's
variables (`RANK`, `WORLD_SIZE`, ...) are used as they are; a SLURM task without them (submitit's
job environment, or `SLURM_*` variables set by srun) gets them from its job: rank, world size,
the job's first node as the master, and a port derived from the job id (`master_port_for_job`).
NCCL on CUDA, gloo on CPU, one device per rank. The rank and world helpers and the collectives
below work with or without a process group (then they are the identity).
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from dinoscale.errors import SlurmError

MASTER_PORT_BASE = 20000
MASTER_PORT_SPAN = 20000


# ----------------------------------------------------------------------------- rank and world
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def launcher_rank() -> int:
    """This process's rank as its launcher (torchrun or SLURM) set it, before any process group exists."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks in place (a no-op in a single process) and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


# ----------------------------------------------------------------------------- SLURM rendezvous
@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int

    def torch_env(self) -> dict[str, str]:
        """The variables `torch.distributed.init_process_group("env://")` and torchrun-style code read."""
        return {
            "RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank), "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank), "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
        }


def master_port_for_job(job_id: str) -> int:
    """The same port on every task of a job, and different ports for jobs (array tasks too) sharing a node."""
    digits = "".join(c for c in str(job_id) if c.isdigit())
    return MASTER_PORT_BASE + int(digits or 0) % MASTER_PORT_SPAN


def distributed_env_from_slurm() -> DistributedEnv:
    """Rank, world size and rendezvous address of this task, from submitit's job environment or SLURM's
    `SLURM_*` variables (a task started by plain srun). The master is the job's first node (127.0.0.1
    for a one-node job) and the port comes from `SLURM_JOB_ID`, which differs between array tasks;
    `MASTER_ADDR` / `MASTER_PORT` in the environment take precedence.
    """
    import submitit
    from submitit.slurm.slurm import SlurmJobEnvironment

    if os.environ.get("SUBMITIT_EXECUTOR"):
        env = submitit.JobEnvironment()
    elif "SLURM_PROCID" in os.environ:
        env = SlurmJobEnvironment()
    else:
        raise SlurmError("distributed_env_from_slurm: this process is not a SLURM or submitit task "
                         "(neither SUBMITIT_EXECUTOR nor SLURM_PROCID is set); start it with srun or submit it")
    num_nodes = env.num_nodes
    return DistributedEnv(
        rank=env.global_rank, world_size=env.num_tasks, local_rank=env.local_rank,
        local_world_size=env.num_tasks // num_nodes, node_rank=env.node, num_nodes=num_nodes,
        master_addr=os.environ.get("MASTER_ADDR") or ("127.0.0.1" if num_nodes == 1 else env.hostnames[0]),
        master_port=int(os.environ.get("MASTER_PORT") or master_port_for_job(env.raw_job_id)),
    )


# ----------------------------------------------------------------------------- process group
@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout: timedelta | None = None) -> DistInfo:
    """Initialise the process group: the ranks torchrun or SLURM launched, else a world of one
    (an in-process store; no port is opened). `timeout` bounds every collective (None: torch's
    default)."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        os.environ.update(distributed_env_from_slurm().torch_env())
    size = int(os.environ.get("WORLD_SIZE", "1"))
    this_rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = dist.HashStore() if size == 1 else None
        dist.init_process_group(backend=backend, rank=this_rank, world_size=size, store=store, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(this_rank, size, local_rank, device)


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
