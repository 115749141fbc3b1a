"""torch.distributed's rendezvous for the tasks of a SLURM job (or of a local submitit run)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import submitit
from submitit.slurm.slurm import SlurmJobEnvironment

from dinoscale.errors import SlurmError

MASTER_PORT_BASE = 20000
MASTER_PORT_SPAN = 20000


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
    for a one-node job); the port comes from `SLURM_JOB_ID`, which differs between array tasks.
    """
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
        master_addr="127.0.0.1" if num_nodes == 1 else env.hostnames[0],
        master_port=master_port_for_job(env.raw_job_id),
    )
