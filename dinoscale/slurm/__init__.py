"""SLURM launching through submitit: executors, checks, job arrays with dependencies, waiting with
clear errors, requeue on preemption, and torch.distributed set-up inside a job."""

from dinoscale.slurm.checks import check_partition, check_slurm_reachable, list_partitions
from dinoscale.slurm.distributed import DistributedEnv, distributed_env_from_slurm, master_port_for_job
from dinoscale.slurm.executor import dry_run_script, is_slurm, make_executor
from dinoscale.slurm.jobs import CheckpointableCall, StageTask, submit, submit_array
from dinoscale.slurm.preemption import PreemptionGuard
from dinoscale.slurm.wait import SlurmJobError, wait_for

__all__ = [
    "CheckpointableCall", "DistributedEnv", "PreemptionGuard", "SlurmJobError", "StageTask", "check_partition",
    "check_slurm_reachable", "distributed_env_from_slurm", "dry_run_script", "is_slurm", "list_partitions",
    "make_executor", "master_port_for_job", "submit", "submit_array", "wait_for",
]
