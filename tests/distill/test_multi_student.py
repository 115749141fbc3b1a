"""Two students on two ranks each (4 real processes, gloo) against single-student distillations on
the same teacher targets, and the teacher's forward once per image of the global batch."""

import hashlib
import json

import pytest
import torch

from dinoscale.config import load_config
from dinoscale.data.stream import build_stream

from conftest import torchrun, write_distill_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(teacher_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("multi_student")
    both = write_distill_config(root / "both.yaml", teacher_run, root / "both_run", {"narrow": [0, 2], "wide": [2, 4]})
    torchrun(4, str(root), str(both), script="distill_ranks.py")
    alone = [write_distill_config(root / f"{name}_alone.yaml", teacher_run, root / f"{name}_run", {name: [0, 2]})
             for name in ("narrow", "wide")]
    torchrun(2, str(root), *map(str, alone), script="distill_ranks.py")
    return root, both


@pytest.mark.parametrize("name", ["narrow", "wide"])
def test_each_student_equals_its_single_student_distillation(runs, name):
    root, _ = runs
    together = torch.load(root / "both" / f"{name}.pt")
    alone = torch.load(root / f"{name}_alone" / f"{name}.pt")
    assert len(together["steps"]) == len(alone["steps"]) == 2
    for a, b in zip(together["steps"], alone["steps"]):
        for term in ("dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss", "total_loss"):
            assert a[term] == pytest.approx(b[term], abs=1e-5), term
    assert together["grads"].keys() == alone["grads"].keys() and len(together["grads"]) > 10
    for key, grad in together["grads"].items():
        torch.testing.assert_close(grad, alone["grads"][key], atol=1e-5, rtol=1e-4, msg=key)
    for key, weight in together["weights"].items():
        torch.testing.assert_close(weight, alone["weights"][key], atol=1e-5, rtol=1e-4, msg=key)


def test_the_students_differ(runs):
    root, _ = runs
    narrow, wide = (torch.load(root / "both" / f"{n}.pt") for n in ("narrow", "wide"))
    assert narrow["weights"]["backbone.cls_token"].shape[-1] == 32
    assert wide["weights"]["backbone.cls_token"].shape[-1] == 48


def test_teacher_sees_every_global_crop_once(runs):
    root, both = runs
    cfg = load_config(str(both))
    per_rank = json.loads((root / "both" / "teacher_crops.json").read_text())
    seen = [h for rank in per_rank for h in rank]
    # the global batch of each step, loaded independently in one process
    stream_cfg = load_config(str(both), ["train.batch_size_per_gpu=8"])
    stream = build_stream(stream_cfg, 0, 1, 0)
    expected = [hashlib.sha1(crop.numpy().tobytes()).hexdigest()
                for step in range(2) for crop in stream.batch(step)["collated_global_crops"]]
    assert len(expected) == 2 * 2 * cfg.distill.global_batch_size  # 2 steps, 2 global crops per image
    assert sorted(seen) == sorted(expected)
    assert all(len(rank) == len(expected) // 4 for rank in per_rank)
