"""Two students on two ranks each (4 real processes, gloo) against single-student distillations on
the same teacher targets, and the teacher's forward once per image of the global batch."""

import hashlib
import json

import pytest
import torch

from dinoscale.config import load_config
from dinoscale.data.stream import build_stream

from conftest import torchrun, write_distill_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


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


def _sinkhorn_knopp(logits, temperature, iterations=3):
    """SwAV's Sinkhorn-Knopp over all N rows: Q = exp(logits / T), alternately every prototype to mass
    1/K and every sample to mass 1/N; rows returned summing to one."""
    q = torch.exp((logits.double() - logits.max()) / temperature).T  # [K, N]
    q /= q.sum()
    n_prototypes, n_samples = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True) * n_prototypes
        q /= q.sum(dim=0, keepdim=True) * n_samples
    return (q * n_samples).T


def test_every_rank_receives_its_images_and_the_global_batch_targets(runs, teacher_run):
    """Step 0 on each of the 4 ranks against the definition: the teacher run in one process on the whole
    global batch, Sinkhorn-Knopp over all its crops (and over all masked tokens), rows of the rank's images."""
    from dinoscale.distill.teacher import FrozenTeacher
    from dinoscale.distributed import process_group

    root, both = runs
    cfg = load_config(str(both))
    batch_size = cfg.distill.global_batch_size
    batch = build_stream(load_config(str(both), [f"train.batch_size_per_gpu={batch_size}"]), 0, 1, 0).batch(0)
    crops, masks = batch["collated_global_crops"], batch["collated_masks"]  # crop-major over the global batch
    teacher_cfg = load_config(str(teacher_run / "run" / "config.yaml"))
    with process_group() as info, torch.no_grad():
        teacher = FrozenTeacher(str(teacher_run / "run"), teacher_cfg, info.device, 1, torch.float32).modules
        out = teacher.backbone(crops, is_training=True)
        cls_logits = teacher.dino_head(out["x_norm_clstoken"])
        patch_logits = teacher.ibot_head(out["x_norm_patchtokens"][masks])  # masked tokens, crop-major
    # the schedule's value at step 0 (the 2-step run's warm-up rounds to no iteration: teacher_temp)
    temperature = torch.load(root / "both" / "narrow.pt")["steps"][0]["teacher_temp"]
    assert temperature == cfg.teacher.teacher_temp
    cls_probs = _sinkhorn_knopp(cls_logits, temperature).unflatten(0, (2, batch_size))
    patch_probs = _sinkhorn_knopp(patch_logits, temperature)
    crop_of_token = masks.nonzero()[:, 0]  # the crop (row of `masks`) of each masked token
    for rank in range(4):
        got = torch.load(root / "both" / f"batch_rank{rank}.pt")
        share = torch.tensor(got["share"])
        rows = torch.cat([share, share + batch_size])  # crop 0 then crop 1 of the rank's images
        assert torch.equal(got["collated_global_crops"], crops[rows]) and torch.equal(got["collated_masks"], masks[rows])
        torch.testing.assert_close(got["cls_probs"].double(), cls_probs[:, share], atol=1e-5, rtol=1e-4)
        mine = torch.cat([patch_probs[crop_of_token == row] for row in rows.tolist()])
        assert mine.shape[0] > 0
        torch.testing.assert_close(got["masked_patch_probs"].double(), mine, atol=1e-5, rtol=1e-4)
