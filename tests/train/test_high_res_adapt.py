"""High-resolution adaptation: continuing from a teacher with its heads (a run directory or a file in the
reference's layout), the reference-scale and tiny presets, and a tiny adaptation run at mixed
resolutions with its Gram teacher fed the larger crops."""

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dinoscale.config import load_config
from dinoscale.data.crop_sizes import CropSizePlan, CropSizes
from dinoscale.distributed import process_group
from dinoscale.errors import CheckpointError, ConfigError
from dinoscale.eval.report import read_metrics
from dinoscale.train.build import build_sharded_model
from dinoscale.train.checkpoint import latest_checkpoint
from dinoscale.train.ssl import SSLMetaArch
from dinoscale.train.trainer import train

from tiny_run import write_tiny_run

FAST = ["train.num_workers=0", "train.peak_flops=1e11", "train.mixed_precision=fp32"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny run of 3 iterations: its checkpoint holds the teacher (backbone and heads) to continue from."""
    workdir = write_tiny_run(tmp_path_factory.mktemp("high_res_adapt"))
    train(_config(workdir, "base", "train.max_iterations=3"))
    return workdir


def _config(workdir, run, *extra):
    return load_config(str(workdir / "tiny.yaml"), [f"train.dataset_path={workdir / 'data' / 'pool'}",
                                                    f"train.output_dir={workdir / run}", *FAST, *extra])


def _checkpoint_teacher(cfg, checkpoint):
    """The teacher (backbone and heads) of a checkpoint of a run of `cfg`, read here with DCP on its own."""
    with torch.device("meta"):
        teacher = SSLMetaArch(cfg).teacher
    teacher.to_empty(device="cpu")
    state = {f"teacher.{name}": tensor for name, tensor in teacher.state_dict().items()}
    dcp.load({"model": state}, checkpoint_id=str(checkpoint))
    return {name.removeprefix("teacher."): tensor for name, tensor in state.items()}


def _run_teacher(workdir):
    return _checkpoint_teacher(_config(workdir, "base"), latest_checkpoint(workdir / "base"))


def _built(cfg):
    with process_group():
        model = build_sharded_model(cfg, torch.device("cpu"), 1)
        options = StateDictOptions(full_state_dict=True)
        return {name: get_model_state_dict(branch, options=options)
                for name, branch in (("student", model.student), ("teacher", model.teacher),
                                     ("gram_teacher", model.gram_teacher))}


def _assert_started_from(built, teacher):
    assert any(name.startswith("dino_head.") for name in teacher) and any(n.startswith("ibot_head.") for n in teacher)
    for branch in ("student", "teacher"):
        assert built[branch].keys() == teacher.keys()
        for name, tensor in teacher.items():
            assert torch.equal(built[branch][name], tensor), (branch, name)
    backbone = {name.removeprefix("backbone."): t for name, t in teacher.items() if name.startswith("backbone.")}
    assert all(torch.equal(built["gram_teacher"][f"backbone.{name}"], t) for name, t in backbone.items())


def test_continuing_from_a_run_starts_every_branch_from_its_teacher_with_heads(base):
    built = _built(_config(base, "unused", f"student.resume_from_teacher_chkpt={base / 'base'}"))
    _assert_started_from(built, _run_teacher(base))


def test_continuing_from_a_reference_layout_teacher_file(base, tmp_path):
    teacher = _run_teacher(base)
    # as the reference writes teacher_checkpoint.pth: blocks chunked for FSDP, the loss centres beside
    chunked = {name.replace("backbone.blocks.", "backbone.blocks.0."): t for name, t in teacher.items()}
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": {**chunked, "dino_loss.center": torch.zeros(1, 64)}}, path)
    _assert_started_from(_built(_config(base, "unused", f"student.resume_from_teacher_chkpt={path}")), teacher)


def test_a_teacher_without_heads_or_a_run_without_checkpoint_stops_with_a_clear_error(base, tmp_path):
    backbone_only = tmp_path / "backbone_only.pth"
    torch.save({"teacher": {n: t for n, t in _run_teacher(base).items() if n.startswith("backbone.")}}, backbone_only)
    with pytest.raises(CheckpointError, match="the file has no heads"):
        _built(_config(base, "unused", f"student.resume_from_teacher_chkpt={backbone_only}"))
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        _built(_config(base, "unused", f"student.resume_from_teacher_chkpt={tmp_path / 'empty_run'}"))
    with pytest.raises(ConfigError, match="not both"):
        _built(_config(base, "unused", f"student.resume_from_teacher_chkpt={base / 'base'}",
                       f"student.pretrained_weights={backbone_only}"))


def test_the_reference_scale_preset_has_the_published_high_resolution_recipe():
    cfg = load_config("train/high_res_adapt")
    plan = CropSizePlan.from_config(cfg.crops, cfg.student.patch_size)
    # dinov3_vit7b16_high_res_adapt.yaml, with 160-px local crops for its 168 (10x10 patches of 16 px either way)
    assert plan.triples == tuple(CropSizes(*t) for t in [(512, 112, 768), (768, 112, 1152), (768, 160, 1152),
                                                          (768, 224, 1152), (768, 336, 1152)])
    assert plan.ratios == (0.3, 0.3, 0.3, 0.05, 0.05)
    assert (cfg.student.arch, cfg.student.drop_path_rate, cfg.dino.head_n_prototypes, cfg.ibot.head_n_prototypes) \
        == ("dinov3_vit7b16", 0.4, 262144, 98304)
    assert (cfg.gram.use_loss, cfg.gram.loss_weight, cfg.teacher.momentum_teacher, cfg.teacher.teacher_temp) \
        == (True, 1.5, 0.999, 0.07)
    assert (cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH, cfg.train.batch_size_per_gpu) == (30000, 8)
    assert cfg.train.activation_checkpointing == "full" and not cfg.crops.horizontal_flips
    # the reference scales 1.25e-5 by 4 sqrt(B / 1024), dinoscale's sqrt_wrt_1024 base_lr by sqrt(B / 1024)
    assert (cfg.optim.base_lr, cfg.optim.scaling_rule, cfg.optim.schedule) == \
        (pytest.approx(4 * 1.25e-5), "sqrt_wrt_1024", "constant_after_warmup")


def test_the_tiny_adaptation_continues_a_small_pool_run_at_mixed_resolution(base):
    data = [f"train.dataset_path={base / 'data' / 'pool'}", "train.batch_size_per_gpu=4", *FAST]
    train(load_config("train/small_pool", [*data, f"train.output_dir={base / 'small'}", "train.max_iterations=1"]))
    cfg = load_config("train/high_res_adapt_tiny", [*data, f"train.output_dir={base / 'adapted'}",
                                                    "train.max_iterations=4", "train.checkpoint_period_iterations=1",
                                                    "train.keep_last_checkpoints=4",
                                                    f"student.resume_from_teacher_chkpt={base / 'small'}"])
    train(cfg)
    plan = CropSizePlan.from_config(cfg.crops, cfg.student.patch_size)
    logged = {m["iteration"]: m for m in read_metrics(base / "adapted" / "metrics.jsonl")}
    for it, metrics in logged.items():  # the Gram teacher is on from iteration 0 and sees the drawn larger crops
        drawn = plan.at(cfg.seed, it)
        assert (metrics["global_crops_size"], metrics["gram_teacher_crops_size"]) == \
            (drawn.global_crops_size, drawn.gram_teacher_crops_size)
        assert "gram_loss" in metrics
    assert {m["global_crops_size"] for m in logged.values()} == {32, 64}
    # iteration 0 has learning rate 0: its checkpoint's teacher is the small-pool run's, heads included
    first = sorted((base / "adapted" / "checkpoints").iterdir())[0]
    assert first.name == "step_0000000"
    small_teacher = _checkpoint_teacher(cfg, latest_checkpoint(base / "small"))
    adapted_teacher = _checkpoint_teacher(cfg, first)
    assert adapted_teacher.keys() == small_teacher.keys()
    for name, tensor in small_teacher.items():
        torch.testing.assert_close(adapted_teacher[name], tensor)
