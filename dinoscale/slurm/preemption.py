"""Preemption and time limits under SLURM: the guard that saves a checkpoint at a safe point and then
lets submitit requeue the job. It lives in `dinoscale.utils.preemption`, which the trainer uses too;
its module documentation describes how the signals arrive and the contract."""

from dinoscale.utils.preemption import PreemptionGuard

__all__ = ["PreemptionGuard"]
