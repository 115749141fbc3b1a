"""Handing a preemption signal over to the handler installed before ours (submitit's requeue)."""

from __future__ import annotations

import signal
import subprocess
from typing import Callable


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
