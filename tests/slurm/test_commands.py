"""`dinoscale submit`: a 2-task training job on the local SLURM cluster against the same run under
torchrun, a preempted training job that requeues and ends with the same weights, a curation stage as a
job array that re-submits only its cancelled slice, dry runs and errors."""

import argparse
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dinoscale.config import load_config
from dinoscale.curation.store import RowStore
from dinoscale.data.synthetic import SyntheticSpec, make_synthetic_pool
from dinoscale.errors import DinoscaleError
from dinoscale.eval.report import read_metrics
from dinoscale.slurm import SlurmJobError, wait_for
from dinoscale.slurm.cli import add_submit_parser
from dinoscale.slurm.commands import JobResources, submit_curation, submit_train

from tiny_run import LOSS_TERMS, write_tiny_run

pytestmark = [pytest.mark.slurm]

N_ITERATIONS = 12


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    # 12 iterations of 2 images a rank
    return write_tiny_run(tmp_path_factory.mktemp("submit"), optim={"epochs": 2}, train={"batch_size_per_gpu": 2})


def _overrides(workdir, run):
    return [f"train.dataset_path={workdir / 'data' / 'pool'}", f"train.output_dir={workdir / run}"]


@pytest.fixture(scope="module")
def torchrun_run(workdir):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "dinoscale.cli", "train", str(workdir / "tiny.yaml"), *_overrides(workdir, "torchrun")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return workdir / "torchrun"


def _losses(run_dir):
    return {m["iteration"]: m for m in read_metrics(run_dir / "metrics.jsonl")}


def _teacher(run_dir):
    return torch.load(run_dir / "export" / "teacher.pth", map_location="cpu", weights_only=True)


def _submit_cli(*argv):
    """`dinoscale submit ...` as dinoscale.cli.main runs it: a DinoscaleError prints one line, exit 2."""
    parser = argparse.ArgumentParser(prog="dinoscale")
    add_submit_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["submit", *argv])
    try:
        return args.handler(args) or 0
    except DinoscaleError as error:
        print(f"dinoscale: error: {error}", file=sys.stderr)
        return 2


@pytest.mark.slow
def test_two_task_job_matches_torchrun(slurm_cluster, workdir, torchrun_run):
    cfg = load_config(str(workdir / "tiny.yaml"), _overrides(workdir, "slurm_two_tasks"))
    job = submit_train(cfg, JobResources(tasks_per_node=2, time_min=60, partition=slurm_cluster.partition))
    results = wait_for(job, poll_s=0.5, timeout_s=300)
    run = workdir / "slurm_two_tasks"
    assert results == [str(run / "export" / "teacher.pth")] * 2
    assert job.paths.stdout.parent == run / "slurm"
    assert load_config(str(run / "slurm" / "config.yaml")) == cfg
    expected, got = _losses(torchrun_run), _losses(run)
    assert sorted(got) == sorted(expected) == list(range(N_ITERATIONS))
    for it in range(N_ITERATIONS):
        for term in LOSS_TERMS:
            if term in expected[it]:
                assert abs(expected[it][term] - got[it][term]) < 1e-5, (it, term)


@pytest.mark.slow
def test_preempted_training_job_requeues_and_ends_with_the_same_weights(slurm_cluster, workdir, torchrun_run):
    cfg = load_config(str(workdir / "tiny.yaml"), _overrides(workdir, "slurm_preempted"))
    run = workdir / "slurm_preempted"
    # >= 50 min: submitit counts a signal as a timeout near the time limit
    job = submit_train(cfg, JobResources(tasks_per_node=2, time_min=60))
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        assert time.monotonic() < deadline, "the job made no progress"
        assert job.state not in ("FAILED", "COMPLETED"), job.state
        time.sleep(0.05)
    slurm_cluster.run("scancel", "--signal=USR2", job.job_id)
    wait_for(job, poll_s=0.5, timeout_s=300)

    log = job.paths.stderr.read_text() if job.paths.stderr.exists() else ""
    assert "resumed from" in log, log[-3000:]
    stopped_at = [int(line.split("checkpoint at iteration ")[1].split()[0]) for line in log.splitlines()
                  if "stop requested: checkpoint at iteration" in line]
    assert stopped_at and 3 <= stopped_at[0] < N_ITERATIONS - 1, stopped_at
    expected, got = _teacher(torchrun_run), _teacher(run)
    assert expected["arch_config"] == got["arch_config"] and expected["model"].keys() == got["model"].keys()
    for name, tensor in expected["model"].items():
        assert torch.allclose(tensor, got["model"][name], rtol=0, atol=1e-6), name


def test_dry_run_prints_the_sbatch_script_and_submits_nothing(slurm_cluster, workdir, capsys):
    code = _submit_cli("train", str(workdir / "tiny.yaml"), *_overrides(workdir, "dry"), "--nodes", "2",
                       "--gpus-per-node", "8", "--partition", "gpu-h100", "--time", "30", "--account", "vision",
                       "--dry-run")
    script = capsys.readouterr().out
    assert code == 0
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu-h100", "#SBATCH --time=30", "#SBATCH --account=vision",
                 "#SBATCH --signal=USR2@90", "#SBATCH --open-mode=append"):
        assert line in script, line
    assert "submitit.core._submit" in script and str(workdir / "dry" / "slurm") in script
    assert not (workdir / "dry").exists()


def test_unknown_partition_and_unreachable_slurm_exit_2(slurm_cluster, workdir, capsys, monkeypatch):
    argv = ("train", str(workdir / "tiny.yaml"), *_overrides(workdir, "never"), "--partition", "gpu-h100")
    assert _submit_cli(*argv) == 2
    assert f"unknown SLURM partition 'gpu-h100'; this cluster has: {slurm_cluster.partition}" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_CONF", str(workdir / "missing.conf"))
    assert _submit_cli(*argv[:-2]) == 2
    assert "SLURM is not reachable" in capsys.readouterr().err
    assert not (workdir / "never").exists()


def test_failing_job_reports_its_error_and_log(slurm_cluster, workdir, capsys):
    code = _submit_cli("train", str(workdir / "tiny.yaml"), "train.dataset_path=" + str(workdir / "no_such_pool"),
                       f"train.output_dir={workdir / 'failing'}")
    out, err = capsys.readouterr()
    assert code == 2
    assert "submitted job" in out and "squeue -j" in out and "sacct -j" in out
    first = err.splitlines()[0]
    assert "failed with" in first and "no_such_pool" in err
    assert str(workdir / "failing" / "slurm") in first


@pytest.fixture(scope="module")
def curation_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("curation_pool")
    make_synthetic_pool(root, SyntheticSpec(n_images=120, image_size=32, eval_per_class=1))
    return root / "pool"


def _curate_cfg(pool, out):
    return load_config("curate/small", [f"curation.pool={pool}", f"curation.output_dir={out}",
                                        "curation.embed.batch_size=16"])


def _slice_logs(jobs):
    return [job.paths.stderr.read_text() if job.paths.stderr.exists() else "" for job in jobs]


@pytest.mark.slow
def test_embed_array_of_three_slices_equals_one_process_and_resubmission_redoes_only_the_cancelled_slice(
        slurm_cluster, curation_pool, tmp_path):
    from dinoscale.curation.pipeline import run_stage

    single = _curate_cfg(curation_pool, tmp_path / "single")
    run_stage(single, "embed")
    cfg = _curate_cfg(curation_pool, tmp_path / "array")
    resources = JobResources(time_min=10)

    first = submit_curation(cfg, resources, 3, only="embed")
    slurm_cluster.run("scancel", first.slices["embed"][1].job_id)  # slice 1 cancelled before it ran
    # the merge depends on the whole array, which a cancelled task (even a pending one) never satisfies:
    # it is cancelled too instead of starting without slice 1, and that ends the wait even when slice 1,
    # cancelled before it started, stays UNKNOWN to sacct
    with pytest.raises(SlurmJobError, match="was cancelled"):
        wait_for(first.all(), poll_s=0.5, timeout_s=120)
    with pytest.raises(SlurmJobError, match="was cancelled"):
        wait_for(first.single["embed"], poll_s=0.5, timeout_s=60)
    for job in first.slices["embed"][::2]:
        wait_for(job, poll_s=0.5, timeout_s=120)
    slices = tmp_path / "array" / "embed" / "parts"
    assert [(slices / f"{i:05d}-of-00003" / "_SUCCESS.json").exists() for i in range(3)] == [True, False, True]

    second = submit_curation(cfg, resources, 3, only="embed")
    wait_for(second.all(), poll_s=0.5, timeout_s=180)
    logs = _slice_logs(second.slices["embed"])
    assert ["already done, skipping" in log for log in logs] == [True, False, True], logs
    assert "embed slice 1/3: done in" in logs[1]
    expected = np.asarray(RowStore.open(tmp_path / "single" / "embed", "embeddings"))
    np.testing.assert_array_equal(np.asarray(RowStore.open(tmp_path / "array" / "embed", "embeddings")), expected)
    assert submit_curation(cfg, resources, 3, only="embed").all() == []  # a finished stage is not submitted again


@pytest.mark.slow
def test_two_task_curation_job_gives_the_single_process_result(slurm_cluster, curation_pool, tmp_path):
    """`dinoscale submit curate --tasks-per-node 2`: dedup and k-means as one 2-task job (a gloo process
    group from the SLURM environment), then the assign array, sampling as a 2-task job, the shards array
    and the report; every output equals a single process's."""
    from dinoscale.curation.pipeline import run_curation

    overrides = ["curation.kmeans.n_clusters=[20,5]", "curation.sampling.target_size=40",
                 "curation.shards.shard_size=20"]
    run_curation(load_config("curate/small", [f"curation.pool={curation_pool}",
                                              f"curation.output_dir={tmp_path / 'single'}", *overrides]))
    code = _submit_cli("curate", "curate/small", f"curation.pool={curation_pool}",
                       f"curation.output_dir={tmp_path / 'job'}", *overrides, "--tasks-per-node", "2",
                       "--slices", "2", "--time", "10")
    assert code == 0
    single, job = tmp_path / "single", tmp_path / "job"
    for stage in ("dedup", "kmeans/levels/level_0", "kmeans/levels/level_1", "assign", "sample", "shards"):
        files = sorted(p.relative_to(single) for p in (single / stage).glob("*") if p.is_file()
                       and p.name != "_SUCCESS.json")
        assert files, stage
        assert [(job / f).read_bytes() == (single / f).read_bytes() for f in files] == [True] * len(files), stage
    assert sorted(p.name for p in (job / "logs").glob("*.log")) == ["rank00000.log", "rank00001.log"]
    assert "k-means level 2" in (job / "logs" / "rank00001.log").read_text()

