"""Job arrays on a real local SLURM cluster: slices plus an afterok merge equal one process; after a
cancelled slice, re-submitting the whole array redoes only that slice."""

import sys
import time
from collections import Counter
from pathlib import Path

import cloudpickle
import pytest

from dinoscale.slurm import SlurmJobError, StageTask, make_executor, submit, submit_array, wait_for
from dinoscale.utils.io import read_json, write_json
from dinoscale.utils.stages import is_done

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the jobs' processes cannot import test modules

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _sum_of_squares_slice(slice_dir, config, control_dir):
    """One slice's partial sum; logs each real run and waits while the test holds this slice."""
    control_dir = Path(control_dir)
    with open(control_dir / "runs.log", "a") as f:
        f.write(f"{config['index']}\n")
    while (control_dir / f"hold_{config['index']}").exists():
        time.sleep(0.2)
    write_json(Path(slice_dir) / "part.json", {"sum": sum(i * i for i in range(config["start"], config["stop"]))})
    return {"items": config["stop"] - config["start"]}


def _merge(slice_dirs, ran_marker=None):
    if ran_marker:
        Path(ran_marker).touch()
    return sum(read_json(Path(d) / "part.json")["sum"] for d in slice_dirs)


def test_array_with_merge_and_rerun_of_a_cancelled_slice(slurm_cluster, tmp_path):
    n_items, bounds = 1000, [(0, 300), (300, 700), (700, 1000)]
    stage_dir, control_dir = tmp_path / "stage", tmp_path / "control"
    control_dir.mkdir()
    slices = [(str(stage_dir / f"slice_{i}"), {"index": i, "start": a, "stop": b}, str(control_dir))
              for i, (a, b) in enumerate(bounds)]
    slice_dirs = [s[0] for s in slices]
    executor = make_executor(tmp_path / "logs", time_min=10, array_parallelism=3)

    (control_dir / "hold_1").touch()
    jobs = submit_array(executor, StageTask(_sum_of_squares_slice), slices)
    merge = submit(executor, _merge, slice_dirs, after=jobs)
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1, "one SLURM array"
    assert wait_for([jobs[0], jobs[2]], poll_s=0.5, timeout_s=120) == [{"items": 300}, {"items": 300}]
    deadline = time.monotonic() + 60
    while "1" not in (control_dir / "runs.log").read_text().split():
        assert time.monotonic() < deadline, "slice 1 never started"
        time.sleep(0.2)
    jobs[1].cancel()
    with pytest.raises(SlurmJobError, match="was cancelled"):
        wait_for(jobs[1], poll_s=0.5, timeout_s=60)
    with pytest.raises(SlurmJobError, match="was cancelled"):  # its afterok dependency can never be met
        wait_for(merge, poll_s=0.5, timeout_s=60)
    assert [is_done(d, s[1]) for d, s in zip(slice_dirs, slices)] == [True, False, True]

    (control_dir / "hold_1").unlink()
    jobs = submit_array(executor, StageTask(_sum_of_squares_slice), slices)
    merge = submit(executor, _merge, slice_dirs, after=jobs)
    assert wait_for(merge, poll_s=0.5, timeout_s=120) == sum(i * i for i in range(n_items))
    assert wait_for(jobs, poll_s=0.5, timeout_s=30) == [{"items": 300}, {"items": 400}, {"items": 300}]
    runs = Counter(int(i) for i in (control_dir / "runs.log").read_text().split())
    assert runs == {0: 1, 1: 2, 2: 1}, "only the cancelled slice ran again"


def test_cancelling_a_pending_task_cancels_the_merge(slurm_cluster, tmp_path):
    """One task at a time: while slice 0 is held, slice 2 is cancelled before it started. The merge
    waits on the whole array, so it is cancelled too and never runs without slice 2."""
    stage_dir, control_dir = tmp_path / "stage", tmp_path / "control"
    control_dir.mkdir()
    slices = [(str(stage_dir / f"slice_{i}"), {"index": i, "start": 10 * i, "stop": 10 * i + 10}, str(control_dir))
              for i in range(3)]
    executor = make_executor(tmp_path / "logs", time_min=10, array_parallelism=1)
    (control_dir / "hold_0").touch()
    jobs = submit_array(executor, StageTask(_sum_of_squares_slice), slices)
    merge = submit(executor, _merge, [s[0] for s in slices], str(control_dir / "merge_ran"), after=jobs)
    deadline = time.monotonic() + 60
    while not (control_dir / "runs.log").exists():
        assert time.monotonic() < deadline, "slice 0 never started"
        time.sleep(0.2)
    jobs[2].cancel()
    (control_dir / "hold_0").unlink()
    assert wait_for(jobs[:2], poll_s=0.5, timeout_s=120) == [{"items": 10}, {"items": 10}]
    with pytest.raises(SlurmJobError, match="was cancelled"):
        wait_for(merge, poll_s=0.5, timeout_s=60)
    assert not (control_dir / "merge_ran").exists()
