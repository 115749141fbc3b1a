"""The distillation presets: the reference-scale one carries DINOv3's published distillation settings
(dinov3/configs/train/dinov3_vitl16_lvd1689m_distilled.yaml), both plan and dry-run against a
teacher run of the matching architecture."""

import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

from dinoscale.cli import main
from dinoscale.config import load_config
from dinoscale.distill.dryrun import dry_run
from dinoscale.distill.plan import make_plan
from dinoscale.train.ssl import SSLMetaArch

REFERENCE = "distill/vit7b16_to_vitsbl"


def _teacher_run(root, preset, *overrides):
    """A teacher run folder as the plan reads it: the run's config and a checkpoint whose metadata lists
    the EMA teacher's backbone and heads (one small tensor each)."""
    checkpoint = root / "checkpoints" / "step_0000000"
    checkpoint.mkdir(parents=True)
    (root / "config.yaml").write_text(OmegaConf.to_yaml(load_config(preset, list(overrides))))
    dcp.save({"model": {f"teacher.{part}.weight": torch.zeros(1) for part in ("backbone", "dino_head", "ibot_head")}},
             checkpoint_id=str(checkpoint))
    return root


def test_reference_preset_has_the_published_distillation_settings():
    cfg = load_config(REFERENCE)
    assert (cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number) == (256, 112, 8)
    assert list(cfg.crops.global_crops_scale) == [0.32, 1.0] and list(cfg.crops.local_crops_scale) == [0.05, 0.32]
    assert (cfg.dino.head_n_prototypes, cfg.dino.head_hidden_dim, cfg.dino.head_bottleneck_dim) == (262144, 8192, 512)
    assert (cfg.ibot.head_n_prototypes, cfg.ibot.head_hidden_dim, cfg.ibot.head_bottleneck_dim) == (98304, 4096, 384)
    assert cfg.ibot.separate_head and cfg.dino.koleo_loss_weight == 0.1 and not cfg.dino.koleo_loss_distributed
    assert list(cfg.ibot.mask_ratio_min_max) == [0.1, 0.5] and cfg.ibot.mask_sample_probability == 0.5
    assert cfg.train.centering == "sinkhorn_knopp" and not cfg.gram.use_loss
    assert (cfg.teacher.teacher_temp, cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher) == (0.07, 0.994, 1.0)
    assert (cfg.optim.lr, cfg.optim.layerwise_decay, cfg.optim.clip_grad, cfg.optim.epochs) == (2e-4, 0.99, 3.0, 20)
    assert cfg.distill.global_batch_size == 1920


def test_reference_preset_plans_vit7b_into_s_b_l_on_240_ranks(tmp_path):
    teacher = _teacher_run(tmp_path / "vit7b", REFERENCE, "student.arch=dinov3_vit7b16")
    cfg = load_config(REFERENCE, [f"distill.teacher={teacher}"])
    plan = make_plan(cfg, world_size=240)
    assert [(s.cfg.student.arch, len(s.ranks)) for s in plan.students] == [
        ("dinov3_vits16", 48), ("dinov3_vitb16", 64), ("dinov3_vitl16", 128)]
    assert [1920 // len(s.ranks) for s in plan.students] == [40, 30, 15] and len(plan.teacher_share(0)) == 8

    text = dry_run(cfg)
    lines = text.splitlines()
    assert len(lines) == 4 and "dinov3_vit7b16" in lines[0] and "sharded over all 240 ranks" in lines[0]
    assert "ranks 0-47 (48), 40 images per rank" in lines[1] and "ranks 112-239 (128), 15 images per rank" in lines[3]
    # weights, gradients and AdamW's two moments: 16 bytes per student parameter, split over the group
    for line, student in zip(lines[1:], plan.students):
        with torch.device("meta"):
            params = sum(p.numel() for p in SSLMetaArch(student.cfg).student.parameters())
        expected_gib = 16 * params / len(student.ranks) / 2**30
        shown = float(line.split("weights, gradients and AdamW ")[1].split(",")[0])
        assert abs(shown - expected_gib) < 0.01 + 0.01 * expected_gib, (line, expected_gib)


def test_tiny_preset_plans_and_dry_runs_from_the_cli(tmp_path, capsys):
    teacher = _teacher_run(tmp_path / "teacher", "train/small_pool")
    cfg = load_config("distill/tiny", [f"distill.teacher={teacher}"])
    plan = make_plan(cfg, world_size=2)
    assert [(s.name, s.ranks, s.cfg.student.embed_dim) for s in plan.students] == [("vit32", (0,), 32), ("vit48", (1,), 48)]
    assert main(["distill", "distill/tiny", f"distill.teacher={teacher}", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[1].startswith("student vit32: vit_small") and "ranks 1-1 (1), 64 images per rank" in out[2]


@pytest.mark.skipif(shutil.which("srun") is None, reason="SLURM client tools not installed")
def test_submit_distill_dry_run_prints_one_job_of_all_ranks(tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert main(["submit", "distill", "distill/tiny", f"train.output_dir={out_dir}", "--tasks-per-node", "2",
                 "--dry-run"]) == 0
    script = capsys.readouterr().out.splitlines()
    assert "#SBATCH --job-name=dinoscale-distill" in script and "#SBATCH --ntasks-per-node=2" in script
    assert not out_dir.exists(), "a dry run writes nothing"
