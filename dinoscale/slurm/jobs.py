"""Submitting work: resumable calls, stage slices that run once, job arrays and afterok dependencies.

A submitted callable must be resumable from its run directory: when SLURM preempts or times out a
job, submitit requeues it and calls the same pickled object again, which must pick up from the
last state it saved there (see `dinoscale.utils.preemption` for how the running code saves it).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Sequence

import submitit
from submitit.helpers import Checkpointable

from dinoscale.slurm.executor import is_slurm
from dinoscale.slurm.wait import wait_for
from dinoscale.utils.stages import is_done, read_marker, stage


class CheckpointableCall(Checkpointable):
    """`fn` made requeueable: on preemption or timeout submitit requeues the job and calls `fn` again
    with the same arguments; `fn` resumes from the checkpoint it keeps in its run directory.

    Only `fn` and its arguments are pickled at requeue, never in-memory state, so keep them small
    (paths and configs).
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"CheckpointableCall({getattr(self.fn, '__qualname__', self.fn)!r})"


class StageTask(CheckpointableCall):
    """A stage, or one slice of it, that runs once: `StageTask(fn)(stage_dir, config, ...)` calls
    `fn(stage_dir, config, ...)` unless `stage_dir` holds a finished marker for `config`
    (`dinoscale.utils.stages`), and returns the counts dict `fn` returned (or the marker's counts).

    Re-submitting a whole array after a crash or a cancellation therefore only redoes unfinished slices.
    """

    def __call__(self, stage_dir: str | Path, config: Any, *args: Any, **kwargs: Any) -> dict:
        if is_done(stage_dir, config):
            return read_marker(stage_dir)["counts"]
        with stage(stage_dir, config) as counts:
            counts.update(self.fn(stage_dir, config, *args, **kwargs) or {})
        return counts


Jobs = submitit.Job | Sequence[submitit.Job]


def submit(executor: submitit.Executor, fn: Callable[..., Any], *args: Any, after: Jobs | None = None,
           **kwargs: Any) -> submitit.Job:
    """Submit `fn(*args, **kwargs)`; with `after`, it starts only once all of those jobs succeeded (for a
    task of a job array: every task of that array)."""
    return _with_dependency(executor, after).submit(fn, *args, **kwargs)


def submit_array(executor: submitit.Executor, fn: Callable[..., Any], list_of_args: Sequence[Any],
                 after: Jobs | None = None) -> list[submitit.Job]:
    """Submit `fn(*args)` for every entry as one SLURM job array (a tuple entry is unpacked into
    positional arguments, anything else is passed as the single argument). At most the executor's
    `array_parallelism` tasks run at once; with `after`, the array waits until those jobs succeeded.
    """
    executor = _with_dependency(executor, after)
    with executor.batch():
        jobs = [executor.submit(fn, *(args if isinstance(args, tuple) else (args,))) for args in list_of_args]
    return jobs


def _with_dependency(executor: submitit.Executor, after: Jobs | None) -> submitit.Executor:
    """The executor itself, or a copy whose jobs start after `after` succeeded.

    On SLURM this is `--dependency=afterok:...` with `--kill-on-invalid-dep=yes`, so a follow-up of a
    failed or cancelled job is cancelled at once instead of pending forever. A local executor has no
    scheduler: it waits for `after` here (raising if any of them failed).
    """
    if after is None:
        return executor
    jobs = [after] if isinstance(after, submitit.Job) else list(after)
    if not jobs:
        return executor
    if not is_slurm(executor):
        wait_for(jobs)
        return executor
    dependent = copy.deepcopy(executor)
    sbatch_options = dict(dependent.parameters.get("additional_parameters") or {})
    sbatch_options["kill-on-invalid-dep"] = "yes"
    options = {"dependency": "afterok:" + ":".join(_dependency_ids(jobs)), "additional_parameters": sbatch_options}
    if not isinstance(dependent, submitit.SlurmExecutor):  # an AutoExecutor names them slurm_*
        options = {f"slurm_{key}": value for key, value in options.items()}
    dependent.update_parameters(**options)
    return dependent


def _dependency_ids(jobs: Sequence[submitit.Job]) -> list[str]:
    """The SLURM ids to depend on: a plain job's own id, an array task's whole array (`123_4` -> `123`).

    A pending array task that is cancelled leaves the array instead of failing, which would satisfy an
    afterok on that task's own id and start the follow-up without it; the array's id is never satisfied
    unless every task of the array succeeded.
    """
    return list(dict.fromkeys(job.job_id.split("_")[0] for job in jobs))
