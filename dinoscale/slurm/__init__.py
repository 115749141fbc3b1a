"""SLURM launching through submitit: executors, checks, job arrays with dependencies, waiting with
clear errors and requeue on preemption. torch.distributed inside a job is set up by
`dinoscale.distributed`; the preemption guard the running code uses is `dinoscale.utils.preemption`."""

from dinoscale.slurm.checks import check_partition, check_slurm_reachable, list_partitions
from dinoscale.slurm.executor import dry_run_script, is_slurm, make_executor
from dinoscale.slurm.jobs import CheckpointableCall, StageTask, submit, submit_array
from dinoscale.slurm.wait import SlurmJobError, wait_for

__all__ = [
    "CheckpointableCall", "SlurmJobError", "StageTask", "check_partition", "check_slurm_reachable", "dry_run_script",
    "is_slurm", "list_partitions", "make_executor", "submit", "submit_array", "wait_for",
]
