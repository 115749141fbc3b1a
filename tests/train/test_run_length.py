"""A run length in iterations (`train.iterations`): every schedule scaled to it, and warnings when a
warm-up, the last-layer freeze or the run's end does not fit the run. Expected values come from the
DINOv2 formulas (linear warm-up, half-cosine decay reaching its floor at the last iteration).
Also the speed figures every metrics row of such a run carries (wall-clock time, windowed speed)."""

import logging
import math
import time

import pytest

from dinoscale.config import load_config
from dinoscale.eval.report import read_metrics
from dinoscale.train.optim import apply_schedules, build_optimizer
from dinoscale.train.schedules import build_schedules, schedule_warnings
from dinoscale.train.trainer import train

from tiny_run import write_tiny_run
from test_schedules import tiny_student

PEAK_LR, MIN_LR = 1e-3, 1e-6


def _recipe(iterations: int, epochs: int, warmup: float, freeze: float, teacher_warmup: float) -> list[str]:
    return [f"train.iterations={iterations}", f"optim.epochs={epochs}", f"optim.warmup_epochs={warmup}",
            f"optim.freeze_last_layer_epochs={freeze}", f"teacher.warmup_teacher_temp_epochs={teacher_warmup}",
            f"optim.lr={PEAK_LR}", f"optim.min_lr={MIN_LR}", "optim.weight_decay=0.04", "optim.weight_decay_end=0.4",
            "teacher.warmup_teacher_temp=0.04", "teacher.teacher_temp=0.07", "teacher.momentum_teacher=0.99",
            "teacher.final_momentum_teacher=1.0"]


def _half_cosine(start: float, end: float, step: int, first: int, last: int) -> float:
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * (step - first) / (last - first)))


def _expected(step: int, iterations: int, warmup: int, freeze: int, teacher_warmup: int) -> dict[str, float]:
    last = iterations - 1
    lr = PEAK_LR * step / warmup if step < warmup else _half_cosine(PEAK_LR, MIN_LR, step, warmup, last)
    return {
        "lr": lr,
        "last_layer_lr": 0.0 if step < freeze else lr,
        "weight_decay": _half_cosine(0.04, 0.4, step, 0, last),
        "teacher_momentum": _half_cosine(0.99, 1.0, step, 0, last),
        "teacher_temp": 0.04 + 0.03 * step / teacher_warmup if step < teacher_warmup else 0.07,
    }


def test_a_448_iteration_run_scales_every_schedule_to_its_length():
    # 10 epochs in 448 iterations: an epoch is 44.8 iterations, so the 1-epoch lr warm-up takes 45, the
    # half-epoch freeze 22 and the 3-epoch teacher-temperature warm-up 134 iterations
    cfg = load_config("train/small_pool", _recipe(448, epochs=10, warmup=1, freeze=0.5, teacher_warmup=3))
    schedules = build_schedules(cfg, global_batch_size=64)
    student = tiny_student()
    optimizer = build_optimizer(student, cfg.optim)
    for step in (0, 21, 22, 44, 45, 46, 133, 134, 300, 446, 447):
        expected = _expected(step, 448, warmup=45, freeze=22, teacher_warmup=134)
        assert schedules.lr(step) == pytest.approx(expected["lr"], rel=1e-12, abs=1e-15), step
        assert schedules.weight_decay_at(step) == pytest.approx(expected["weight_decay"], rel=1e-12), step
        assert schedules.teacher_momentum(step) == pytest.approx(expected["teacher_momentum"], rel=1e-12), step
        assert schedules.teacher_temperature(step) == pytest.approx(expected["teacher_temp"], rel=1e-12), step
        apply_schedules(optimizer, schedules, step)  # what the optimiser's prototype-layer group gets
        (last_layer,) = [g for g in optimizer.param_groups if g["is_last_layer"]]
        assert last_layer["lr"] == pytest.approx(expected["last_layer_lr"] * last_layer["lr_multiplier"]), step
    assert schedules.lr(447) == MIN_LR and schedules.total_iterations == 448
    assert schedule_warnings(schedules, 448) == []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("run_length"), gram={"use_loss": False},
                          train={"peak_flops": 1e12})  # no start-up measurement of the matmul peak


def _tiny_config(root, run_dir, *overrides):
    return load_config(str(root / "tiny.yaml"), [f"train.dataset_path={root / 'data' / 'pool'}",
                                                 f"train.output_dir={run_dir}", *overrides])


WINDOW = 5


@pytest.fixture(scope="module")
def scaled_run(tiny, tmp_path_factory):
    """12 iterations of 4 epochs (3 iterations each); the log (and speed) window is 5 iterations."""
    run_dir = tmp_path_factory.mktemp("scaled") / "run"
    started = time.time()
    train(_tiny_config(tiny, run_dir, *_recipe(12, epochs=4, warmup=1, freeze=0.5, teacher_warmup=2),
                       f"train.log_period_iterations={WINDOW}"))
    return read_metrics(run_dir / "metrics.jsonl"), started, time.time()


def test_the_trainer_runs_the_scaled_schedule_to_its_floor(scaled_run):
    rows, _, _ = scaled_run
    assert [row["iteration"] for row in rows] == list(range(12))
    for row in rows:  # warm-up 3, freeze round(1.5) = 2, teacher warm-up 6 iterations
        expected = _expected(row["iteration"], 12, warmup=3, freeze=2, teacher_warmup=6)
        for name, value in expected.items():
            assert row[name] == pytest.approx(value, rel=1e-9, abs=1e-15), (row["iteration"], name)
    assert rows[-1]["lr"] == MIN_LR


def test_warm_ups_kept_in_epochs_of_a_one_epoch_run_are_reported():
    # the trap of the issue: OFFICIAL_EPOCH_LENGTH=448 optim.epochs=1 leaves the DINOv2 lengths in epochs
    cfg = load_config(None, ["train.OFFICIAL_EPOCH_LENGTH=448", "optim.epochs=1"])
    problems = schedule_warnings(build_schedules(cfg, 64), 448)
    assert len(problems) == 3
    assert problems[0].startswith("the learning-rate warm-up (optim.warmup_epochs) lasts 4480 of the run's 448 "
                                  "iterations, more than half of it")
    assert problems[1].startswith("the last-layer freeze (optim.freeze_last_layer_epochs) lasts 448 of the run's 448")
    assert problems[2].startswith("the teacher-temperature warm-up (teacher.warmup_teacher_temp_epochs) lasts 13440")
    # the same lengths scaled with train.iterations fit: 10%, 1% and 30% of the run
    scaled = load_config(None, ["train.iterations=448", "optim.epochs=100"])
    assert schedule_warnings(build_schedules(scaled, 64), 448) == []
    # a warm-up of exactly half the run is not reported, one iteration more is
    half = load_config(None, ["train.iterations=100", "optim.epochs=100", "optim.warmup_epochs=50"])
    assert schedule_warnings(build_schedules(half, 64), 100) == []
    longer = load_config(None, ["train.iterations=100", "optim.epochs=100", "optim.warmup_epochs=51"])
    assert "optim.warmup_epochs" in schedule_warnings(build_schedules(longer, 64), 100)[0]


def test_a_run_stopped_before_its_schedule_ends_logs_warnings(tiny, tmp_path, caplog):
    # a 12-iteration schedule (2 epochs of 6) with a 1-epoch warm-up, stopped after 3 iterations
    cfg = _tiny_config(tiny, tmp_path / "run", "optim.epochs=2", "optim.warmup_epochs=1",
                       "optim.freeze_last_layer_epochs=0.2", f"optim.lr={PEAK_LR}", "train.max_iterations=3")
    with caplog.at_level(logging.WARNING, logger="dinoscale"):
        train(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "the learning-rate warm-up (optim.warmup_epochs) lasts 6 of the run's 3 iterations, more than half of it; "
        "shorten it, or give the run length as train.iterations so that every length in epochs is scaled to the run",
        f"train.max_iterations stops the run after 3 of its schedule's 12 iterations: the learning rate is still "
        f"{PEAK_LR * 2 / 6:.3g} at the last step, not its floor optim.min_lr = 1e-06; set train.iterations=3 to fit "
        "the schedule to the run"]
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 3
