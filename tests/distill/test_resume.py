"""A distillation job (4 real processes, two students) killed between checkpoints and started again
ends with the same student weights as an uninterrupted one."""

import os
import signal
import time

import pytest
import torch

from dinoscale.eval.report import read_metrics
from dinoscale.models import load_backbone
from dinoscale.train.checkpoint import checkpoint_dirs

from conftest import torchrun, write_distill_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
GROUPS = {"narrow": [0, 2], "wide": [2, 4]}


def _last_iteration(run_dir):
    metrics = run_dir / "metrics.jsonl"
    return max((m["iteration"] for m in read_metrics(metrics)), default=-1) if metrics.exists() else -1


def _descendants(pid):
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def test_killed_and_resumed_job_ends_with_the_same_students(teacher_run, tmp_path):
    common = {"iterations": 4, "checkpoint_period_iterations": 2}
    straight = write_distill_config(tmp_path / "straight.yaml", teacher_run, tmp_path / "straight", GROUPS, **common)
    torchrun(4, "distill", str(straight))

    killed = write_distill_config(tmp_path / "killed.yaml", teacher_run, tmp_path / "killed", GROUPS, **common)
    process = torchrun(4, "distill", str(killed), wait=False)
    deadline = time.time() + 300
    while _last_iteration(tmp_path / "killed" / "wide") < 2:  # the checkpoint of iteration 1 is written
        assert process.poll() is None and time.time() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.05)
    for pid in [*_descendants(process.pid), process.pid]:
        os.kill(pid, signal.SIGKILL)
    process.wait()
    time.sleep(1)
    saved = {name: [p.name for p in checkpoint_dirs(tmp_path / "killed" / name)] for name in GROUPS}
    assert all(names and names[-1] != "step_0000003" for names in saved.values()), saved
    done = torchrun(4, "distill", str(killed))
    assert f"resumed narrow from {tmp_path / 'killed' / 'narrow' / 'checkpoints' / saved['narrow'][-1]}" in done.stderr

    for name in GROUPS:
        a = torch.load(tmp_path / "killed" / name / "export" / "student.pth", weights_only=True)["model"]
        b = torch.load(tmp_path / "straight" / name / "export" / "student.pth", weights_only=True)["model"]
        assert a.keys() == b.keys() and len(a) > 10 and all(torch.equal(a[k], b[k]) for k in a), name
        # the export is an official-layout backbone file
        backbone = load_backbone(str(tmp_path / "straight" / name / "export" / "student.pth"))
        assert backbone.embed_dim == {"narrow": 32, "wide": 48}[name]
