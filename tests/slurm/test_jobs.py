"""Jobs on a real local SLURM cluster: ranks of a 2-task job, failures, cancellations, partitions."""

import os
import sys
import time

import cloudpickle
import pytest

from dinoscale.errors import SlurmError
from dinoscale.distributed import distributed_env_from_slurm
from dinoscale.slurm import SlurmJobError, check_partition, check_slurm_reachable, make_executor, submit, wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the jobs' processes cannot import test modules

pytestmark = pytest.mark.slurm


def _rank_and_all_reduce():
    import torch
    import torch.distributed as dist

    env = distributed_env_from_slurm()
    os.environ.update(env.torch_env())
    dist.init_process_group("gloo")
    value = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(value)
    dist.destroy_process_group()
    return {"rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank,
            "master": (env.master_addr, env.master_port), "sum": value.item()}


def test_two_tasks_get_their_ranks_and_meet(slurm_cluster, tmp_path):
    executor = make_executor(tmp_path / "logs", tasks_per_node=2, time_min=10, partition=slurm_cluster.partition)
    job = submit(executor, _rank_and_all_reduce)
    reports = wait_for(job, poll_s=0.5, timeout_s=120)
    assert [r["rank"] for r in reports] == [0, 1]
    assert [r["local_rank"] for r in reports] == [0, 1]
    assert all(r["world_size"] == 2 and r["sum"] == 1 + 2 for r in reports)
    port = 20000 + int(job.job_id) % 20000
    assert all(r["master"] == ("127.0.0.1", port) for r in reports)


def _broken_slice(index):
    raise ValueError(f"slice {index} is broken")


def test_failing_job_surfaces_its_exception_and_log(slurm_cluster, tmp_path):
    executor = make_executor(tmp_path / "logs", time_min=10)
    job = submit(executor, _broken_slice, 7)
    with pytest.raises(SlurmJobError) as caught:
        wait_for(job, poll_s=0.5, timeout_s=120)
    message = str(caught.value)
    assert "ValueError: slice 7 is broken" in message.splitlines()[0]
    assert str(caught.value.stderr) in message.splitlines()[0]
    assert caught.value.stderr.exists() and "slice 7 is broken" in caught.value.stderr.read_text()
    assert caught.value.state == "FAILED" and caught.value.job_id == job.job_id


def _sleep_after_marking(marker, seconds):
    open(marker, "w").close()
    time.sleep(seconds)
    return "finished"


def test_cancelled_job_is_reported_not_waited_on(slurm_cluster, tmp_path):
    executor = make_executor(tmp_path / "logs", time_min=10)
    marker = tmp_path / "started"
    job = submit(executor, _sleep_after_marking, str(marker), 600)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.2)
    job.cancel()
    start = time.monotonic()
    with pytest.raises(SlurmJobError, match="was cancelled") as caught:
        wait_for(job, poll_s=0.5, timeout_s=60)
    assert caught.value.state.startswith("CANCELLED")
    assert time.monotonic() - start < 30


def test_partition_checks(slurm_cluster):
    check_slurm_reachable()
    check_partition(slurm_cluster.partition)
    with pytest.raises(SlurmError, match=rf"unknown SLURM partition 'gpu-h100'; this cluster has: "
                                         rf"{slurm_cluster.partition} \(default\)"):
        check_partition("gpu-h100")
