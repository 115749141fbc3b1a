"""Training at mixed resolutions: the tiny run with two (global, local, Gram-teacher) crop-size triples.
Every rank trains each step at the triple drawn from (seed, step); a checkpoint of 2 real processes
(gloo) resumed in one process continues with the same triples and losses."""

import os
import subprocess
import sys

import pytest

from dinoscale.config import load_config
from dinoscale.data.crop_sizes import CropSizePlan
from dinoscale.eval.report import read_metrics
from dinoscale.models.loading import read_training_record
from dinoscale.train.trainer import train

from tiny_run import LOSS_TERMS, write_tiny_run

# 16 and 24 px global crops (learned position embedding made for 16 px, interpolated at 24); the Gram
# teacher sees 24 and 32 px crops, resized to the student's 4x4 and 6x6 patch grids
MIXED = {"global_crops_size": [16, 24], "local_crops_size": [8, 12], "gram_teacher_crops_size": [24, 32],
         "global_local_crop_pairs_ratios": [0.5, 0.5], "local_crops_number": 2}
SIZE_KEYS = ("global_crops_size", "local_crops_size", "gram_teacher_crops_size")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("mixed_resolution"), crops=MIXED)


def _overrides(workdir, run, *extra):
    # a given peak skips the start-up matmul measurement (MFU is not what these tests check)
    return [f"train.dataset_path={workdir / 'data' / 'pool'}", f"train.output_dir={workdir / run}",
            "train.peak_flops=1e11", *extra]


def _cli(workdir, run, *extra, nproc=1):
    command = ["-m", "dinoscale.cli", "train", str(workdir / "tiny.yaml"), *_overrides(workdir, run, *extra)]
    if nproc > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *command]
    done = subprocess.run([sys.executable, *command], env={**os.environ, "PYTHONWARNINGS": "ignore"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _metrics(run_dir):
    return {m["iteration"]: m for m in read_metrics(run_dir / "metrics.jsonl")}


def _drawn(cfg, iterations):
    plan = CropSizePlan.from_config(cfg.crops, cfg.student.patch_size)
    return {it: tuple(getattr(plan.at(cfg.seed, it), key) for key in SIZE_KEYS) for it in iterations}


def _logged(metrics):
    return {it: tuple(m[key] for key in SIZE_KEYS) for it, m in metrics.items()}


def test_a_rope_student_trains_at_the_drawn_sizes_and_records_the_largest(workdir):
    cfg = load_config(str(workdir / "tiny.yaml"), _overrides(workdir, "rope", "student.pos_embed_type=rope",
                                                                 "train.max_iterations=5"))
    exported = train(cfg)
    logged = _metrics(workdir / "rope")
    assert _logged(logged) == _drawn(cfg, range(5))
    assert {sizes[0] for sizes in _logged(logged).values()} == {16, 24}  # both triples were trained on
    assert all("gram_loss" in logged[it] for it in (3, 4))
    # evaluations default to the largest global size the run trained at
    assert read_training_record(exported) == {"global_crops_size": 24, "local_crops_size": 12}


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_and_a_resume_train_at_the_same_sizes_with_the_same_losses(workdir):
    cfg = load_config(str(workdir / "tiny.yaml"), _overrides(workdir, "unused"))
    _cli(workdir, "two_ranks", "train.batch_size_per_gpu=2", "train.max_iterations=4", nproc=2)
    resumed = workdir / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)  # the 2-rank run's checkpoint of iteration 2, continued in one process
    subprocess.run(["cp", "-r", str(workdir / "two_ranks" / "checkpoints" / "step_0000002"), str(resumed)], check=True)
    assert "resumed from" in _cli(workdir, "resumed", "train.max_iterations=4").stderr
    double, after = _metrics(workdir / "two_ranks"), _metrics(workdir / "resumed")
    assert _logged(double) == _drawn(cfg, range(4)) and _logged(after) == _drawn(cfg, range(3, 4))
    assert {sizes[0] for sizes in _logged(double).values()} == {16, 24}
    # one process on the whole global batch computes what the 2 ranks did (the Gram term too, from iteration 3)
    for term in LOSS_TERMS:
        assert abs(double[3][term] - after[3][term]) < 1e-5, term
