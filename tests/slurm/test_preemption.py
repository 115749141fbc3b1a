"""Preemption: the guard's signal contract in-process, and a real preempted 2-task job on the local
cluster that checkpoints, is requeued and finishes with the result of an uninterrupted run."""

import os
import signal
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from dinoscale.distributed import distributed_env_from_slurm
from dinoscale.slurm import CheckpointableCall, make_executor, submit, wait_for
from dinoscale.utils.preemption import PreemptionGuard
from dinoscale.utils.io import read_json, write_json, write_text

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the jobs' processes cannot import test modules


class HandedOver(Exception):
    pass


def _stand_in_for_submitit(signum, frame):
    raise HandedOver(signum)


@pytest.fixture
def submitit_usr2_handler():
    """USR2 handled as submitit's job process handles it; restored afterwards."""
    previous = signal.signal(signal.SIGUSR2, _stand_in_for_submitit)
    yield
    signal.signal(signal.SIGUSR2, previous)


@pytest.fixture
def no_usr2_handler():
    """USR2 with its default action, as outside submitit; restored afterwards."""
    previous = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGUSR2, previous)


def _send_and_wait(guard, signum):
    os.kill(os.getpid(), signum)
    deadline = time.monotonic() + 5
    while not guard.requested and time.monotonic() < deadline:
        time.sleep(0.01)


def test_preemption_is_flagged_then_handed_to_submitit(submitit_usr2_handler):
    with PreemptionGuard(grace_s=None) as guard:
        assert not guard.sync()
        _send_and_wait(guard, signal.SIGUSR2)  # would have raised HandedOver without the guard
        assert guard.requested and guard.preempted and guard.sync()
        with pytest.raises(HandedOver):
            guard.checkpoint_saved()
    assert signal.getsignal(signal.SIGUSR2) is _stand_in_for_submitit


def test_sigterm_asks_for_a_checkpoint_but_not_a_requeue(submitit_usr2_handler):
    previous_term = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard(grace_s=None) as guard:
        _send_and_wait(guard, signal.SIGTERM)
        assert guard.requested and not guard.preempted and guard.sync()
        guard.checkpoint_saved()  # returns: the loop goes on until SLURM stops it
        assert not guard.requested
    assert signal.getsignal(signal.SIGTERM) is previous_term


def test_guard_hands_over_when_no_safe_point_comes(submitit_usr2_handler):
    with PreemptionGuard(grace_s=0.3) as guard:
        with pytest.raises(HandedOver):
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(5)  # a long step that never reaches checkpoint_saved()
        assert guard.preempted


def test_without_submitit_the_process_exits_with_the_signal_status(no_usr2_handler):
    with PreemptionGuard(grace_s=None) as guard:
        _send_and_wait(guard, signal.SIGUSR2)
        assert guard.sync()
        with pytest.raises(SystemExit) as caught:
            guard.checkpoint_saved()
    assert caught.value.code == 128 + signal.SIGUSR2


def test_a_loop_that_stops_also_hands_over_a_preemption_signal_that_came_after_sync(submitit_usr2_handler):
    with PreemptionGuard(grace_s=None) as guard:
        _send_and_wait(guard, signal.SIGTERM)
        assert guard.sync() and not guard.preempted
        os.kill(os.getpid(), signal.SIGUSR2)  # submitit's preemption: SIGTERM, then USR2
        deadline = time.monotonic() + 5
        while not guard.preempted and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(HandedOver):
            guard.checkpoint_saved(stopping=True)


def test_a_loop_that_stops_returns_after_the_preemption_signal_without_submitit(no_usr2_handler):
    with PreemptionGuard(grace_s=None) as guard:
        _send_and_wait(guard, signal.SIGUSR2)
        assert guard.sync()
        guard.checkpoint_saved(stopping=True)  # the caller ends its loop itself
        assert not guard.requested


def _count_with_checkpoints(run_dir, total_steps):
    """Sum of world_size * step over steps 1..total_steps, one all-reduce per step, resumable from run_dir."""
    import torch
    import torch.distributed as dist

    env = distributed_env_from_slurm()
    os.environ.update(env.torch_env())
    dist.init_process_group("gloo")
    run_dir = Path(run_dir)
    state_file = run_dir / "state.json"
    state = read_json(state_file) if state_file.exists() else {"step": 0, "total": 0}
    with open(run_dir / f"starts_rank{env.rank}.log", "a") as f:
        f.write(f"{state['step']}\n")
    with PreemptionGuard() as guard:
        while state["step"] < total_steps:
            value = torch.tensor([float(state["step"] + 1)])
            dist.all_reduce(value)
            state = {"step": state["step"] + 1, "total": state["total"] + int(value.item())}
            if env.rank == 0:
                write_text(run_dir / "progress", str(state["step"]))
            time.sleep(0.1)
            if guard.sync():
                if env.rank == 0:
                    write_json(state_file, state)
                guard.checkpoint_saved()
    dist.destroy_process_group()
    return state["total"]


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    total_steps, world_size = 40, 2
    # >= 50 min: submitit treats a signal as a timeout when the job is near its time limit
    executor = make_executor(tmp_path / "logs", tasks_per_node=world_size, time_min=60)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job = submit(executor, CheckpointableCall(_count_with_checkpoints), str(run_dir), total_steps)
    progress = run_dir / "progress"
    deadline = time.monotonic() + 90
    while not (progress.exists() and int(progress.read_text()) >= 8):
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.1)
    job._interrupt()  # a preemption: SIGTERM, then USR2, to every task
    results = wait_for(job, poll_s=0.5, timeout_s=150)

    uninterrupted = sum(world_size * step for step in range(1, total_steps + 1))
    assert results == [uninterrupted] * world_size
    for rank in range(world_size):
        starts = [int(s) for s in (run_dir / f"starts_rank{rank}.log").read_text().split()]
        assert len(starts) == 2 and starts[0] == 0, starts  # requeued exactly once
        assert 8 <= starts[1] < total_steps, starts  # resumed from the checkpoint, not from scratch
