"""Waiting for submitted jobs: their results, or a SlurmJobError that says what happened and where the logs are.

A job that raised is reported with its exception and log paths as soon as any of its tasks wrote the
error; a job that ended without a result (cancelled, killed for time or memory, node failure) is
reported with its SLURM accounting state instead of being waited on forever.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import submitit
from submitit.core.utils import pickle_load

from dinoscale.errors import SlurmError

# A completed job's result file may show up a little later on a network file system.
RESULT_FILE_GRACE_S = 30.0


class SlurmJobError(SlurmError):
    """A submitted job failed, was cancelled or was killed; `state` is SLURM's (or FAILED for an exception)."""

    def __init__(self, message: str, *, job_id: str, state: str, stderr: Path, stdout: Path,
                 traceback: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.state = state
        self.stderr = stderr
        self.stdout = stdout
        self.traceback = traceback


def wait_for(jobs: submitit.Job | Sequence[submitit.Job], *, poll_s: float = 2.0,
             timeout_s: float | None = None) -> Any:
    """Wait until `jobs` finish and return their results (a list for a list of jobs; a job with several
    tasks gives the list of its tasks' results). Raises SlurmJobError for the first job that failed or
    ended without a result, and TimeoutError after `timeout_s`.
    """
    single = isinstance(jobs, submitit.Job)
    job_list = [jobs] if single else list(jobs)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = list(job_list)
    outcomes: dict[Path, tuple[str, Any]] = {}
    while pending:
        if any(isinstance(job, submitit.SlurmJob) for job in pending):
            submitit.SlurmJob.watcher.update()  # one sacct call for all jobs per round
        for job in pending:
            _raise_if_a_task_failed(job, outcomes)
        for job in pending:
            _raise_if_it_ended_without_result(job, outcomes)
        pending = [job for job in pending if not job.done()]
        if not pending:
            break
        if deadline is not None and time.monotonic() > deadline:
            states = ", ".join(f"{job.job_id}: {job.state}" for job in pending)
            raise TimeoutError(f"SLURM jobs still unfinished after {timeout_s:.0f} s ({states})")
        time.sleep(poll_s)
    results = [_results(job, outcomes) for job in job_list]
    return results[0] if single else results


def _tasks(job: submitit.Job) -> list[submitit.Job]:
    return [job.task(index) for index in range(job.num_tasks)]


def _outcome(path: Path, outcomes: dict[Path, tuple[str, Any]]) -> tuple[str, Any] | None:
    """("success", result) or ("error", traceback) from a task's result file; None while there is none."""
    if path not in outcomes and path.exists():
        outcomes[path] = pickle_load(path)
    return outcomes.get(path)


def _raise_if_a_task_failed(job: submitit.Job, outcomes: dict[Path, tuple[str, Any]]) -> None:
    for task in _tasks(job):
        outcome = _outcome(task.paths.result_pickle, outcomes)
        if outcome is not None and outcome[0] == "error":
            raise _failure(task, outcome[1])


def _raise_if_it_ended_without_result(job: submitit.Job, outcomes: dict[Path, tuple[str, Any]]) -> None:
    """A SLURM job that ended other than COMPLETED (cancelled, timed out, killed) and wrote no result is
    reported now rather than after the others: those may never end (an array task cancelled before it
    started stays UNKNOWN to sacct, and jobs that depend on it are cancelled)."""
    if not isinstance(job, submitit.SlurmJob) or not job.done() or job.state.upper().startswith("COMPLETED"):
        return
    for task in _tasks(job):
        if _outcome(task.paths.result_pickle, outcomes) is None:
            raise _ended_without_result(task, job.state)


def _results(job: submitit.Job, outcomes: dict[Path, tuple[str, Any]]) -> Any:
    results = []
    for task in _tasks(job):
        path = task.paths.result_pickle
        if not path.exists() and job.state == "COMPLETED":
            stop = time.monotonic() + RESULT_FILE_GRACE_S
            while not path.exists() and time.monotonic() < stop:
                time.sleep(1.0)
        outcome = _outcome(path, outcomes)
        if outcome is None:
            raise _ended_without_result(task, job.state)
        kind, value = outcome
        if kind == "error":
            raise _failure(task, value)
        results.append(value)
    return results if job.num_tasks > 1 else results[0]


def _failure(task: submitit.Job, trace: str) -> SlurmJobError:
    last_line = next((line for line in reversed(trace.strip().splitlines()) if line.strip()), "an exception")
    return SlurmJobError(
        f"SLURM job {task.job_id} (task {task.task_id}) failed with {last_line.strip()} "
        f"(log: {task.paths.stderr})\n  stdout: {task.paths.stdout}\n{trace.rstrip()}",
        job_id=task.job_id, state="FAILED", stderr=task.paths.stderr, stdout=task.paths.stdout, traceback=trace)


def _ended_without_result(task: submitit.Job, state: str) -> SlurmJobError:
    what = "was cancelled" if state.upper().startswith("CANCELLED") else f"ended in state {state} without a result"
    tail = _tail(task.paths.stderr, 20)
    return SlurmJobError(
        f"SLURM job {task.job_id} (task {task.task_id}) {what} (log: {task.paths.stderr})\n"
        f"  stdout: {task.paths.stdout}" + (f"\n  last lines of the log:\n{tail}" if tail else ""),
        job_id=task.job_id, state=state, stderr=task.paths.stderr, stdout=task.paths.stdout)


def _tail(path: Path, lines: int) -> str:
    if not path.exists():
        return ""
    return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-lines:])
