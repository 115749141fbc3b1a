"""Preemption and time limits: how a running job saves its state before it is stopped or requeued.

How the signals arrive
----------------------
submitit runs every task as `python -m submitit.core._submit`, which installs two handlers in the
task's process before it calls the submitted function: on the preemption signal (USR2, or
`$SUBMITIT_PREEMPT_SIGNAL`) rank 0 calls the function's `checkpoint()` (see `CheckpointableCall`),
runs `scontrol requeue` and exits, while other ranks do nothing; SIGTERM and SIGCONT are only logged.
SLURM sends USR2 90 s before the time limit (`#SBATCH --signal=USR2@90`); `scancel --signal=USR2 JOB`
or `job._interrupt()` send it at once. SIGTERM comes with `scancel`, with a scheduler preemption and
with the requeue itself, and SIGKILL follows after KillWait. submitit's preemption sends SIGTERM, then
USR2: the USR2 (requeue) wins.

submitit's handler runs wherever the main thread is at that moment: mid-step, mid-collective, on
rank 0 only. That suits work whose files on disk are always consistent (stage slices that write
atomically: wrapped in `CheckpointableCall`/`StageTask` they are simply called again after the
requeue), but not a trainer, whose checkpoint is a collective save at a step boundary.

The contract for code that saves its own checkpoint
---------------------------------------------------
It runs its loop inside a `PreemptionGuard`, which for its duration replaces both handlers by ones
that only record the signal, and calls `sync()` at safe points — a collective, so every rank calls it
at the same points (a step boundary; every few steps is enough):

    with PreemptionGuard() as guard:
        for step in range(start_step, total_steps):
            train_step()
            if guard.sync():              # the same answer on all ranks (one all-reduce if distributed)
                save_checkpoint()         # collectively
                guard.checkpoint_saved()  # after USR2: requeue and exit; after SIGTERM alone: continue

After the preemption signal `checkpoint_saved()` hands over to submitit's handler, so rank 0 requeues
the job and exits and the other ranks exit quietly; the requeued job calls the same function, which
resumes from the checkpoint it just wrote. After SIGTERM alone (a cancellation, or a kill, is coming)
it returns: the checkpoint is on disk and the loop continues until SLURM stops it. Outside submitit
(torchrun, a plain process) `checkpoint_saved()` after USR2 exits with status 128 + the signal number,
for an outer script to requeue.

A loop that ends after any signal's checkpoint (the trainer) calls `checkpoint_saved(stopping=True)`:
a USR2 that came after the last `sync()` (submitit sends it right after SIGTERM) is answered too, and
the call returns after the hand-over instead of exiting, so the caller stops in its own way.

If the code reaches no safe point within `grace_s` of USR2 (keep it below the 90 s notice), the guard
hands over anyway and the job resumes from its previous checkpoint. The guard must be entered in the
main thread; it uses SIGALRM for the grace, from the preemption signal on.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from types import FrameType
from typing import Any, Callable

from submitit import JobEnvironment

from dinoscale.utils.logging import get_logger

log = get_logger(__name__)

_NOTHING, _TERMINATING, _PREEMPTED = 0, 1, 2


class PreemptionGuard:
    """Turns SLURM's preemption/timeout signal (USR2) and SIGTERM into a flag checked at safe points."""

    def __init__(self, grace_s: float | None = 60.0) -> None:
        self.grace_s = grace_s
        self.preempt_signal = JobEnvironment._usr_sig()
        self._pending = _NOTHING  # the strongest signal this rank received and no checkpoint answered yet
        self._agreed = _NOTHING  # what the last sync() agreed on over all ranks
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "PreemptionGuard":
        self._previous[self.preempt_signal] = signal.signal(self.preempt_signal, self._on_preempt)
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_terminate)
        return self

    def __exit__(self, *exc: object) -> None:
        self._disarm_grace()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @property
    def requested(self) -> bool:
        """A signal arrived on this rank and no checkpoint answered it yet."""
        return self._pending > _NOTHING

    @property
    def preempted(self) -> bool:
        """The preemption/timeout signal arrived on this rank: the job is to be requeued."""
        return self._pending == _PREEMPTED

    def sync(self) -> bool:
        """Whether any rank of an initialised torch.distributed group (else this process) received a signal;
        all ranks get the same answer. Call it at every safe point; when True, save and `checkpoint_saved()`."""
        level = self._pending
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            import torch

            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            agreed = torch.tensor([level], device=device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            level = int(agreed.item())
        self._agreed = max(self._agreed, level)
        return self._agreed > _NOTHING

    def checkpoint_saved(self, stopping: bool = False) -> None:
        """Call on every rank once the checkpoint is written: after the preemption signal (agreed by the
        last `sync()`) it requeues the job and exits; after SIGTERM alone it returns.

        `stopping`: the caller ends its loop after this checkpoint. A preemption signal that arrived since
        the last `sync()` is then agreed (one more collective) and answered too, and the call returns after
        handing over (on ranks other than 0, or outside submitit) instead of exiting.
        """
        if stopping:
            self.sync()
        level, self._agreed = self._agreed, _NOTHING
        if self._pending <= level:  # a stronger signal that came after sync() waits for the next one
            self._pending = _NOTHING
        if level != _PREEMPTED:
            return
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's part of the checkpoint is written before rank 0 requeues
        self._hand_over(exit_after=not stopping)

    def _on_preempt(self, signum: int, frame: FrameType | None) -> None:
        log.warning("caught %s: saving a checkpoint at the next safe point, then requeueing",
                    signal.Signals(signum).name)
        if self.grace_s and self._pending != _PREEMPTED:
            if signal.SIGALRM not in self._previous:
                self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._on_grace_expired)
            signal.setitimer(signal.ITIMER_REAL, self.grace_s)
        self._pending = _PREEMPTED

    def _on_terminate(self, signum: int, frame: FrameType | None) -> None:
        log.warning("caught SIGTERM: saving a checkpoint at the next safe point")
        self._pending = max(self._pending, _TERMINATING)

    def _on_grace_expired(self, signum: int, frame: FrameType | None) -> None:
        log.warning("no safe point within %.0f s of the preemption signal: requeueing from the last checkpoint",
                    self.grace_s)
        self._hand_over(exit_after=True)

    def _disarm_grace(self) -> None:
        if signal.SIGALRM in self._previous:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _hand_over(self, exit_after: bool) -> None:
        """Give the preemption signal to the handler installed before the guard (submitit's: rank 0 requeues
        and exits, other ranks return); then exit, unless `exit_after` is false."""
        self._disarm_grace()
        submitit_handler = self._previous.get(self.preempt_signal)
        if callable(submitit_handler):
            hand_over(submitit_handler, self.preempt_signal)
            if exit_after:
                raise SystemExit(0)
        elif exit_after:
            raise SystemExit(128 + self.preempt_signal)


def hand_over(handler: Callable, signum: int) -> None:
    """Call `handler(signum, None)`.

    submitit's handler runs `scontrol requeue`, and SLURM answers a requeue by terminating the job
    step, that very scontrol included: a requeue command killed by SIGTERM means the requeue took
    effect, so this process exits quietly instead of reporting a failed job.
    """
    try:
        handler(signum, None)
    except subprocess.CalledProcessError as err:
        if err.returncode == -signal.SIGTERM and "requeue" in list(err.cmd):
            raise SystemExit(0) from None
        raise
