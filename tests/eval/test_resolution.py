"""The resolution evaluations run at: the training resolution the weights record (or their run's
config.yaml says), stated in the report with the crop; the whole-image path; and the batched
preprocessing giving the numbers of the per-image transform."""

import json

import numpy as np
import torch
from PIL import Image

from dinoscale.config import load_config
from dinoscale.data.pool import open_pool
from dinoscale.eval.cli import main
from dinoscale.eval.evaluate import evaluate_knn
from dinoscale.eval.features import ArrayImages, extract_features
from dinoscale.eval.resolution import eval_resolution
from dinoscale.models.loading import load_backbone, save_backbone

from test_features import reference_input

QUICK = ["eval.batch_size=8", "eval.num_workers=0", "eval.precision=fp32", "eval.knn_k=[1,5]"]


def test_knn_defaults_to_the_training_resolution_the_export_records(workspace, tmp_path, capsys, tiny_backbone):
    weights = tmp_path / "teacher.pth"
    save_backbone(tiny_backbone(), weights, training={"global_crops_size": 16, "local_crops_size": 8})
    assert main(["knn", "--weights", str(weights), "--train", str(workspace / "train"), "--val",
                 str(workspace / "val"), "--out", str(tmp_path / "out"), *QUICK]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["resolution"] == {"image_size": 16, "resize": "center_crop",
                                    "source": "the training resolution recorded in teacher.pth"}
    # the same numbers as an evaluation told to use 16 px (the default would otherwise be 224)
    at_16 = evaluate_knn(load_backbone(weights), open_pool(workspace / "train"), open_pool(workspace / "val"),
                         load_config(None, [*QUICK, "eval.image_size=16"]).eval)
    assert report["knn"]["top1"] == {str(k): v for k, v in at_16.top1.items()}
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "16 px (the training resolution recorded in teacher.pth); short side resized to 18 px, centre crop of " \
           "16 px" in markdown
    assert "k-NN top-1 at 16 px (center_crop)" in capsys.readouterr().out


def test_the_resolution_comes_from_the_override_the_run_config_or_the_protocol(tmp_path, tiny_backbone):
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "config.yaml").write_text("crops:\n  global_crops_size: 24\n")
    save_backbone(tiny_backbone(), run / "export" / "teacher.pth")  # written before exports recorded their training
    defaults = load_config(None).eval
    from_run = eval_resolution(defaults, run / "export" / "teacher.pth")
    assert (from_run.image_size, from_run.source) == (
        24, f"the training resolution, crops.global_crops_size in {(run / 'config.yaml').resolve()}")
    chosen = eval_resolution(load_config(None, ["eval.image_size=32", "eval.resize=whole_image"]).eval,
                             run / "export" / "teacher.pth")
    assert (chosen.image_size, chosen.resize, chosen.source) == (32, "whole_image", "eval.image_size")
    assert chosen.describe() == "32 px (eval.image_size); whole image resized to 32x32 px (no crop)"
    official = tmp_path / "official.pth"
    torch.save(tiny_backbone().state_dict(), official)  # a bare state dict, as the official releases ship
    protocol = eval_resolution(defaults, official)
    assert protocol.image_size == 224 and protocol.source.startswith("the DINO protocol's")


def test_batched_preprocessing_gives_the_per_image_transform_in_workers_too(tiny_backbone):
    images = np.random.default_rng(3).integers(0, 256, (10, 24, 24, 3), dtype=np.uint8)
    model = tiny_backbone()
    with torch.no_grad():
        expected = model.forward_features(torch.stack([reference_input(im, 16) for im in images]))
    for workers in (0, 2):
        features = extract_features(model, ArrayImages(images), image_size=16, batch_size=4, num_workers=workers,
                                    precision="fp32", device=torch.device("cpu"))
        torch.testing.assert_close(features.cls, expected["x_norm_clstoken"], atol=1e-5, rtol=1e-5)


def test_whole_image_resizes_without_cropping(tiny_backbone):
    images = np.random.default_rng(4).integers(0, 256, (3, 20, 30, 3), dtype=np.uint8)  # not square
    model = tiny_backbone()
    whole = extract_features(model, ArrayImages(images), image_size=16, precision="fp32", device=torch.device("cpu"),
                             resize="whole_image")
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    inputs = []
    for image in images:  # written out: the whole image, bicubic, to 16 x 16 pixels
        array = np.asarray(Image.fromarray(image).resize((16, 16), Image.BICUBIC), dtype=np.float32) / 255.0
        inputs.append(torch.from_numpy(((array - mean) / std).astype(np.float32)).permute(2, 0, 1))
    with torch.no_grad():
        expected = model.forward_features(torch.stack(inputs))
    torch.testing.assert_close(whole.cls, expected["x_norm_clstoken"], atol=1e-5, rtol=1e-5)
