"""`dinoscale eval knn|linear|visualize|report` on a folder of tiny PNGs with a tiny saved backbone."""

import json
import re
import shutil

import pytest
from PIL import Image

from dinoscale.data.pool import open_pool
from dinoscale.eval.cli import main
from dinoscale.eval.evaluate import checkpoint_iteration, evaluate_knn
from dinoscale.eval.online import online_knn
from dinoscale.config import load_config

FAST = ["eval.image_size=16", "eval.batch_size=8", "eval.num_workers=0", "eval.precision=fp32"]


def _args(workspace, out: str, *extra: str) -> list[str]:
    return ["--weights", str(workspace / "backbone.pth"), "--train", str(workspace / "train"),
            "--val", str(workspace / "val"), "--out", str(workspace / out), *FAST, *extra]


def _embedded_images(html: str) -> int:
    return len(re.findall(r"src='data:image/png;base64,", html))


def test_knn_command(workspace, capsys):
    assert main(["knn", *_args(workspace, "knn", "eval.knn_features=patch_mean", "eval.knn_k=[1,5,50]")]) == 0
    report = json.loads((workspace / "knn" / "report.json").read_text())
    assert report["knn"]["n_queries"] == 12
    # colours are separable even for a random backbone's mean patch token; k=50 > 24 uses the whole bank
    assert report["knn"]["top1"]["1"] == 100.0 and report["knn"]["top1"]["5"] == 100.0
    assert set(report["knn"]["top1"]) == {"1", "5", "50"}
    assert report["eval"]["knn_features"] == "patch_mean"
    assert "| 5 | 100.00 |" in (workspace / "knn" / "report.md").read_text()
    assert "5-NN 100.00%" in capsys.readouterr().out


def test_linear_command(workspace):
    assert main(["linear", *_args(workspace, "linear", "eval.linear_epochs=20", "eval.linear_lrs=[0.01,0.1]",
                                  "eval.linear_weight_decays=[0.0]")]) == 0
    report = json.loads((workspace / "linear" / "report.json").read_text())["linear"]
    assert len(report["grid"]) == 2
    assert report["n_test"] == 12 and report["n_train"] == 24
    assert report["test_top1"] >= 90.0


def test_visualize_command(workspace):
    out = workspace / "pictures"
    assert main(["visualize", "--weights", str(workspace / "backbone.pth"), "--images", str(workspace / "val"),
                 "--out", str(out), *FAST, "eval.visualize_n_images=3"]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 2
    assert Image.open(out / pngs[0]).size[0] > 64 * 3
    assert _embedded_images((out / "report.html").read_text()) == 2


def test_report_command_with_metrics_and_checkpoints(workspace):
    run = workspace / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"iteration": i * 10, "total_loss": 9.0 - i * 0.5, "dino_global_loss": 4.0 - i * 0.2,
                                "ibot_loss": 3.0 - i * 0.1, "koleo_loss": -0.02 * i}) + "\n")
    for step in (200, 100):
        shutil.copy(workspace / "backbone.pth", run / f"teacher_{step:07d}.pth")
    args = ["report", "--run", str(run), "--train", str(workspace / "train"), "--val", str(workspace / "val"),
            "--out", str(workspace / "report"), *FAST, "eval.knn_k=[5]", "--checkpoints",
            str(run / "teacher_0000200.pth"), str(run / "teacher_0000100.pth")]
    assert main(args) == 0
    report = json.loads((workspace / "report" / "report.json").read_text())
    assert [p["iteration"] for p in report["knn_history"]] == [100, 200]
    assert report["knn_history"][0]["top1"] == report["knn_history"][1]["top1"]  # same weights
    assert _embedded_images((workspace / "report" / "report.html").read_text()) == 2


@pytest.mark.parametrize("mistake", ["no_labels", "missing_weights", "bad_key", "no_metrics"])
def test_user_mistakes_exit_2_with_one_line(workspace, tmp_path, capsys, mistake):
    if mistake == "no_labels":
        flat = tmp_path / "flat"
        flat.mkdir()
        shutil.copy(next((workspace / "train" / "red").glob("*.png")), flat / "a.png")
        args = ["knn", "--weights", str(workspace / "backbone.pth"), "--train", str(flat), "--val", str(flat),
                "--out", str(tmp_path / "o"), *FAST]
        message = "has no labels"
    elif mistake == "missing_weights":
        args = ["knn", *_args(workspace, "o")]
        args[2] = str(tmp_path / "nope.pth")
        message = "does not exist"
    elif mistake == "bad_key":
        args = ["knn", *_args(workspace, "o", "eval.knn_kk=[5]")]
        message = "did you mean 'eval.knn_k'"
    else:
        args = ["report", "--out", str(tmp_path / "o")]
        message = "nothing to report"
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_val_with_a_subset_of_classes_is_scored_against_train_class_names(workspace, tiny_backbone):
    cfg = load_config(overrides=[*FAST, "eval.knn_features=patch_mean", "eval.knn_k=[5]"]).eval
    model = tiny_backbone()
    result = evaluate_knn(model, open_pool(workspace / "train"), open_pool(workspace / "val_subset"), cfg)
    assert result.top1[5] == 100.0  # without remapping, val "red" (index 1) would be compared to train "green"


def test_online_knn_gives_loggable_metrics_and_keeps_the_mode(workspace, tiny_backbone):
    cfg = load_config(overrides=[*FAST, "eval.knn_k=[5,10]"]).eval
    model = tiny_backbone().train()
    metrics = online_knn(model, open_pool(workspace / "train"), open_pool(workspace / "val"), cfg)
    assert set(metrics) == {"knn_top1_k5", "knn_top1_k10", "knn_top5_k5", "knn_top5_k10"}
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    assert model.training


def test_checkpoint_iteration_from_names():
    assert checkpoint_iteration("runs/x/model_0004999.pth") == 4999
    assert checkpoint_iteration("runs/x/ckpt/5000/teacher.pth") == 5000
    assert checkpoint_iteration("runs/x/final.pth") is None
