"""submitit executors for a SLURM cluster (or local processes), and the sbatch script a submission uses."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import cloudpickle
import submitit
from submitit.core.utils import DelayedSubmission

from dinoscale.errors import SlurmError


def make_executor(folder: str | Path, *, nodes: int = 1, tasks_per_node: int = 1, gpus_per_node: int = 0,
                  cpus_per_task: int = 1, partition: str | None = None, time_min: int = 60,
                  account: str | None = None, qos: str | None = None, constraint: str | None = None,
                  mem_gb: float | None = None, local: bool = False, array_parallelism: int = 256,
                  name: str = "dinoscale", max_requeues: int = 3,
                  extra: dict[str, Any] | None = None) -> submitit.AutoExecutor:
    """An executor that submits to SLURM, or runs the same tasks as local processes when `local`.

    `folder` receives the submission pickles and each task's logs (`%j_%t_log.out/.err`); on a cluster
    it must be on a file system the compute nodes see. `time_min` is the wall-clock limit (the job gets
    USR2 90 s before it); `max_requeues` caps how often a timed-out checkpointable job is requeued
    (submitit counts a signal as a timeout once the job ran min(0.8 * time_min, time_min - 10) minutes,
    so preemptions of jobs shorter than 10 minutes count too); `extra` adds raw sbatch options
    (`{"exclusive": True, "mail-type": "END"}`). `mem_gb=None` takes the partition's default memory. Partition, account, qos, constraint and `extra` are ignored locally.
    """
    for what, value in (("nodes", nodes), ("tasks_per_node", tasks_per_node), ("cpus_per_task", cpus_per_task),
                        ("time_min", time_min), ("array_parallelism", array_parallelism)):
        if value < 1:
            raise SlurmError(f"make_executor: {what} must be at least 1, got {value}")
    if gpus_per_node < 0 or (mem_gb is not None and mem_gb <= 0):
        raise SlurmError(f"make_executor: gpus_per_node must be >= 0 and mem_gb > 0, got {gpus_per_node} and {mem_gb}")
    if local and nodes > 1:
        raise SlurmError(f"make_executor: a local run has one node, got nodes={nodes}; drop --local to use SLURM")
    if not local and shutil.which("srun") is None:
        raise SlurmError("cannot submit to SLURM: `srun` is not on PATH. Submit from a SLURM login node, "
                         "or run on this machine with --local")
    executor = submitit.AutoExecutor(folder=folder, cluster="local" if local else "slurm",
                                     slurm_max_num_timeout=max_requeues)
    executor.update_parameters(
        name=name, nodes=nodes, tasks_per_node=tasks_per_node, cpus_per_task=cpus_per_task, timeout_min=time_min,
        gpus_per_node=gpus_per_node or None, mem_gb=mem_gb,
        slurm_partition=partition, slurm_account=account, slurm_qos=qos, slurm_constraint=constraint,
        slurm_array_parallelism=array_parallelism, slurm_additional_parameters=dict(extra or {}),
        # One task that dies ends the step, instead of its peers hanging in a collective.
        slurm_srun_args=["--kill-on-bad-exit=1"],
    )
    return executor


def is_slurm(executor: submitit.Executor) -> bool:
    return isinstance(executor, submitit.SlurmExecutor) or getattr(executor, "cluster", None) == "slurm"


def dry_run_script(executor: submitit.Executor, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """The sbatch script `executor.submit(fn, *args, **kwargs)` would submit, without submitting anything.

    The call itself travels as a pickle next to the script, so this also checks that it can be pickled.
    """
    inner = getattr(executor, "_executor", executor)
    if not isinstance(inner, submitit.SlurmExecutor):
        raise SlurmError("dry run: this executor runs locally and has no sbatch script; drop --local to see one")
    try:
        cloudpickle.dumps(DelayedSubmission(fn, *args, **kwargs))
    except Exception as error:
        raise SlurmError(f"dry run: the call to {getattr(fn, '__name__', fn)!r} cannot be pickled for submission "
                         f"({type(error).__name__}: {error}); pass plain data and module-level functions") from error
    return inner._make_submission_file_text(inner._submitit_command_str, uid="dry-run")
