"""SLURM plumbing that needs no running cluster: sbatch rendering, reachability messages, the
distributed environment of a task, the local executor, and stage slices that run once."""

import shutil
import socket
import sys
from types import SimpleNamespace

import cloudpickle
import pytest

from dinoscale.errors import SlurmError
from dinoscale.distributed import distributed_env_from_slurm
from dinoscale.slurm import StageTask, check_slurm_reachable, dry_run_script, make_executor, submit, wait_for
from dinoscale.slurm.jobs import _with_dependency

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the jobs' processes cannot import test modules

needs_srun = pytest.mark.skipif(shutil.which("srun") is None, reason="SLURM client tools not installed")


def _add(a, b):
    return a + b


@needs_srun
def test_dry_run_renders_requested_options_without_submitting(tmp_path):
    executor = make_executor(tmp_path / "logs", nodes=2, tasks_per_node=4, gpus_per_node=8, cpus_per_task=10,
                             partition="gpu", time_min=120, account="vision", qos="high", constraint="volta32gb",
                             mem_gb=64, name="pretrain", extra={"exclusive": True, "mail-type": "END"})
    script = dry_run_script(executor, _add, 1, 2)
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --partition=gpu", "#SBATCH --time=120",
                 "#SBATCH --account=vision", "#SBATCH --qos=high", "#SBATCH --constraint=volta32gb",
                 "#SBATCH --mem=64GB", "#SBATCH --job-name=pretrain", "#SBATCH --exclusive",
                 "#SBATCH --mail-type=END", "#SBATCH --signal=USR2@90"]:
        assert line in script.splitlines(), line
    assert "srun" in script and "--kill-on-bad-exit=1" in script and "submitit.core._submit" in script
    assert not list((tmp_path / "logs").glob("*.pkl")), "a dry run must not submit"


@needs_srun
def test_a_dependency_on_array_tasks_names_their_whole_array(tmp_path):
    """A cancelled pending task leaves its array, which would release an afterok on the task itself."""
    jobs = [SimpleNamespace(job_id=job_id) for job_id in ("41_0", "41_2", "57", "41_1")]
    script = dry_run_script(_with_dependency(make_executor(tmp_path / "logs"), jobs), _add, 1, 2)
    assert "#SBATCH --dependency=afterok:41:57" in script.splitlines()
    assert "#SBATCH --kill-on-invalid-dep=yes" in script.splitlines()


@needs_srun
def test_dry_run_rejects_what_cannot_be_pickled(tmp_path):
    executor = make_executor(tmp_path / "logs")
    with pytest.raises(SlurmError, match="cannot be pickled"):
        dry_run_script(executor, _add, socket.socket(), 1)


def test_executor_rejects_impossible_requests(tmp_path):
    with pytest.raises(SlurmError, match="tasks_per_node must be at least 1"):
        make_executor(tmp_path, tasks_per_node=0, local=True)
    with pytest.raises(SlurmError, match="a local run has one node"):
        make_executor(tmp_path, nodes=2, local=True)


def test_unreachable_when_sinfo_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SlurmError, match=r"SLURM is not reachable: `sinfo` is not on PATH.*--local"):
        check_slurm_reachable()


@needs_srun
def test_unreachable_when_slurm_conf_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "nowhere.conf"))
    with pytest.raises(SlurmError, match="SLURM_CONF points to .*nowhere.conf, which is not a file"):
        check_slurm_reachable()


@needs_srun
def test_unreachable_when_controller_is_down(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "slurm.conf"
    conf.write_text(f"ClusterName=ghost\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort={port}\n"
                    "MessageTimeout=1\nNodeName=localhost CPUs=1\nPartitionName=debug Nodes=localhost\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    with pytest.raises(SlurmError, match=r"SLURM is not reachable: `sinfo` failed .*scontrol ping"):
        check_slurm_reachable(timeout_s=20)


def test_distributed_env_from_slurm_variables(monkeypatch):
    for name in ("SUBMITIT_EXECUTOR", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    # rank 5 of a 2-node job with 4 tasks per node, as srun sets it
    for name, value in {"SLURM_JOB_ID": "1234", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                        "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}.items():
        monkeypatch.setenv(name, value)
    env = distributed_env_from_slurm()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert (env.node_rank, env.num_nodes, env.master_addr, env.master_port) == (1, 2, "gpu07", 21234)
    assert env.torch_env()["MASTER_ADDR"] == "gpu07" and env.torch_env()["RANK"] == "5"
    monkeypatch.setenv("SLURM_JOB_ID", "1235")  # the next array task on the same node
    assert distributed_env_from_slurm().master_port == 21235


def test_distributed_env_outside_a_task_says_so(monkeypatch):
    for name in ("SUBMITIT_EXECUTOR", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SlurmError, match="not a SLURM or submitit task"):
        distributed_env_from_slurm()


def _rank_report():
    env = distributed_env_from_slurm()
    return env.rank, env.world_size, env.master_addr, env.master_port


def test_local_executor_runs_tasks_and_waits_for_dependencies(tmp_path):
    executor = make_executor(tmp_path / "logs", tasks_per_node=2, time_min=5, local=True)
    first = submit(executor, _rank_report)
    second = submit(executor, _add, 2, 3, after=first)  # locally, `after` waits for `first` to succeed
    reports = first.results()
    assert sorted(r[0] for r in reports) == [0, 1]
    assert {r[1:] for r in reports} == {(2, "127.0.0.1", reports[0][3])}
    assert wait_for(second) == [5, 5]


def _record_run(stage_dir, config, log):
    with open(log, "a") as f:
        f.write(f"{config['index']}\n")
    return {"items": config["stop"] - config["start"]}


def test_stage_task_runs_each_slice_once_per_config(tmp_path):
    log = tmp_path / "runs.log"
    task = StageTask(_record_run)
    config = {"index": 0, "start": 0, "stop": 10}
    assert task(tmp_path / "slice_0", config, log) == {"items": 10}
    assert task(tmp_path / "slice_0", config, log) == {"items": 10}  # skipped, counts from the marker
    assert task(tmp_path / "slice_0", {**config, "stop": 12}, log) == {"items": 12}  # another config redoes it
    assert log.read_text().split() == ["0", "0"]
