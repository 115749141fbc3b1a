"""The distillation plan: rank groups, image shares, and bad input stopped with one line before any work."""

import re

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml

from dinoscale.cli import main
from dinoscale.config import load_config
from dinoscale.distill.plan import make_plan
from dinoscale.errors import CheckpointError, ConfigError

from conftest import write_distill_config


def _config(teacher_run, tmp_path, students, *overrides, **changes):
    path = write_distill_config(tmp_path / "distill.yaml", teacher_run, tmp_path / "out", students)
    if changes:
        raw = yaml.safe_load(path.read_text())
        for entry in raw["distill"]["students"]:
            entry["overrides"] = entry["overrides"] + changes.get(entry["name"], [])
        path.write_text(yaml.safe_dump(raw))
    return load_config(str(path), list(overrides))


def test_shares_cover_the_global_batch_once_for_the_teacher_and_once_per_student(teacher_run, tmp_path):
    plan = make_plan(_config(teacher_run, tmp_path, {"narrow": [0, 1], "wide": [1, 4]},
                             "distill.global_batch_size=12"), world_size=4)
    teacher = [i for r in range(4) for i in plan.teacher_share(r)]
    assert teacher == list(range(12))
    for student, ranks in zip(plan.students, ([0], [1, 2, 3])):
        assert student.ranks == tuple(ranks)
        assert [i for r in ranks for i in plan.student_share(r)] == list(range(12))
        assert student.cfg.train.batch_size_per_gpu == 12 // len(ranks)
        assert student.cfg.train.output_dir.endswith(f"out/{student.name}")
    assert plan.students[1].cfg.student.embed_dim == 48 and plan.students[0].cfg.student.embed_dim == 32


@pytest.mark.parametrize("groups, world, message", [
    ({"narrow": [0, 2], "wide": [1, 4]}, 4, "students 'narrow' and 'wide' both claim rank 1"),
    ({"narrow": [0, 1], "wide": [2, 4]}, 4, "ranks [1] have no student"),
    ({"narrow": [0, 2], "wide": [2, 6]}, 4, "ranks [4, 5] do not exist"),
    ({"narrow": [2, 2], "wide": [0, 2]}, 4, "ranks_range = [2, 2] must be [first, end)"),
])
def test_bad_rank_groups(teacher_run, tmp_path, groups, world, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_plan(_config(teacher_run, tmp_path, groups), world_size=world)


def test_crop_size_not_a_multiple_of_a_students_patch_size(teacher_run, tmp_path):
    cfg = _config(teacher_run, tmp_path, {"narrow": [0, 1], "wide": [1, 2]}, wide=["student.patch_size=6"])
    with pytest.raises(ConfigError, match=r"crops.global_crops_size = 16 is not a multiple of .*\(wide\)'s patch size 6"):
        make_plan(cfg, world_size=2)


@pytest.mark.parametrize("change, message", [
    (["crops.local_crops_size=12"], "overrides crops.local_crops_size, which every student shares with the job"),
    (["dino.head_n_prototypes=32"], "dino.head_n_prototypes = 32, the teacher's heads have 64"),
    (["dino.koleo_loss_distributed=true"], "dino.koleo_loss_distributed is not supported"),
])
def test_student_overrides_that_cannot_work(teacher_run, tmp_path, change, message):
    cfg = _config(teacher_run, tmp_path, {"narrow": [0, 1], "wide": [1, 2]}, wide=change)
    with pytest.raises(ConfigError, match=message):
        make_plan(cfg, world_size=2)


def test_global_batch_must_split_over_every_group(teacher_run, tmp_path):
    cfg = _config(teacher_run, tmp_path, {"narrow": [0, 1], "wide": [1, 4]}, "distill.global_batch_size=8")
    with pytest.raises(ConfigError, match="global_batch_size = 8 must be a positive multiple"):
        make_plan(cfg, world_size=4)


def test_teacher_export_without_heads(teacher_run, tmp_path):
    exported = tmp_path / "teacher.pth"
    exported.write_bytes(b"weights")
    cfg = _config(teacher_run, tmp_path, {"narrow": [0, 1]}, f"distill.teacher={exported}")
    with pytest.raises(CheckpointError, match="holds a backbone without the DINO and iBOT heads"):
        make_plan(cfg, world_size=1)


def test_teacher_checkpoint_without_ibot_head(teacher_run, tmp_path):
    run = tmp_path / "headless"
    (run / "checkpoints" / "step_0000000").mkdir(parents=True)
    (run / "config.yaml").write_text((teacher_run / "run" / "config.yaml").read_text())
    dcp.save({"model": {"teacher.backbone.cls_token": torch.zeros(1, 1, 32),
                        "teacher.dino_head.weight": torch.zeros(2)}}, checkpoint_id=str(run / "checkpoints" / "step_0000000"))
    cfg = _config(teacher_run, tmp_path, {"narrow": [0, 1]}, f"distill.teacher={run}")
    with pytest.raises(CheckpointError, match="has no teacher ibot_head; distillation needs"):
        make_plan(cfg, world_size=1)


def test_cli_prints_one_line_and_starts_nothing(teacher_run, tmp_path, capsys):
    path = write_distill_config(tmp_path / "bad.yaml", teacher_run, tmp_path / "out", {"narrow": [0, 2]})
    assert main(["distill", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must cover the 1 ranks of the job exactly: ranks [1] do not exist" in err[0]
    assert not (tmp_path / "out").exists()
