"""Dense probes end to end on small image folders with VOC-style masks and depth maps: a per-patch
separable toy is learnt (mIoU near 100%, small depth error), random labels stay at chance,
predictions are scored at each label map's own size, bad targets are reported with counts,
and `dinoscale eval dense` writes its report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinoscale.config import load_config
from dinoscale.errors import DataError
from dinoscale.eval.cli import main as eval_main
from dinoscale.eval.dense import evaluate_dense, evaluate_dense_backbone
from dinoscale.eval.dense_data import DenseDataset, open_dense_datasets
from dinoscale.eval.patch_features import BackbonePatches, PixelPatches
from dinoscale.eval.segmentation import SegmentationTask
from dinoscale.models.loading import save_backbone
from dinoscale.models.presets import build_backbone

COLOURS = np.array([[230, 40, 40], [40, 200, 60], [50, 60, 220]])
DEPTH_OF_CLASS = np.array([2.0, 5.0, 8.0])


def write_blocks(root, split, n, seed, block=4, size=16, random_labels=False):
    """Images of `size` px tiled with `block`-px squares, each in the colour of its class (plus noise);
    the mask holds the class of each square (or random classes), depth the class's depth in mm."""
    rng = np.random.default_rng(seed)
    for folder in ("images", "masks", "depth"):
        (root / split / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        grid = rng.integers(0, 3, (size // block, size // block))
        classes = np.kron(grid, np.ones((block, block), dtype=np.int64))
        image = np.clip(COLOURS[classes] + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        if random_labels:
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            classes = np.kron(rng.integers(0, 4, grid.shape), np.ones((block, block), dtype=np.int64))
        Image.fromarray(image).save(root / split / "images" / f"{i:03d}.png")
        Image.fromarray(classes.astype(np.uint8)).save(root / split / "masks" / f"{i:03d}.png")
        depth_mm = np.round(DEPTH_OF_CLASS[classes % 3] * 1000).astype(np.uint16)
        Image.fromarray(depth_mm).save(root / split / "depth" / f"{i:03d}.png")


def dense_config(root, *extra):
    overrides = [f"eval.dense.{role}_{what}={root / split / folder}" for role, split in (("train", "train"),
                                                                                        ("val", "val"))
                 for what, folder in (("dataset", "images"), ("masks", "masks"), ("depth", "depth"))]
    return load_config(None, [*overrides, "eval.dense.image_size=16", "eval.num_workers=0", "eval.batch_size=16",
                              "eval.precision=fp32", "eval.dense.lrs=[0.01,0.1]", "eval.dense.weight_decays=[0.0]",
                              "eval.dense.epochs=15", "eval.dense.batch_size=8", "eval.dense.min_depth=0.5",
                              *extra]).eval


@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    write_blocks(root, "train", 40, seed=0)
    write_blocks(root, "val", 12, seed=1)
    return root


def interior(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 3 x 3 neighbourhood holds one class: away from the boundaries, where the
    bilinearly upsampled logits of two patches mix."""
    padded = np.pad(mask, 1, mode="edge")
    same = np.ones(mask.shape, dtype=bool)
    for dy in range(3):
        for dx in range(3):
            same &= padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]] == mask
    return same


def test_per_patch_separable_toy_reaches_miou_near_100_and_small_depth_error(blocks):
    cfg = dense_config(blocks)
    result = evaluate_dense(PixelPatches(4), *open_dense_datasets(cfg.dense), cfg, torch.device("cpu"), n_pictures=12)
    assert result.n_classes == 3
    # every error lies on a class boundary, where the upsampled logits of two patches mix
    assert result.segmentation.scores["miou"] > 93.0, result.segmentation
    assert result.segmentation.scores["pixel_accuracy"] > 96.0
    for picture in result.pictures:
        true, predicted = picture["mask"]
        assert (predicted[interior(true)] == true[interior(true)]).all()
    # depth: the exact depth of each patch, upsampled the same way, is as good as a per-patch probe can be
    best = []
    for picture in result.pictures:
        true = picture["depth"][0]
        per_patch = torch.from_numpy(true[2::4, 2::4])[None, None]
        upsampled = F.interpolate(per_patch, size=true.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
        best.append(np.sqrt(np.mean((upsampled - true) ** 2)))
    assert result.depth.scores["rmse"] < np.mean(best) + 0.1, (result.depth, np.mean(best))
    assert (result.segmentation.n_train, result.segmentation.n_val, result.segmentation.n_test) == (40, 4, 12)
    assert len(result.segmentation.grid) == 2 and result.skipped == {"train": {}, "val": {}}


def test_random_labels_stay_at_chance(tmp_path):
    write_blocks(tmp_path, "train", 40, seed=2, random_labels=True)
    write_blocks(tmp_path, "val", 20, seed=3, random_labels=True)
    cfg = dense_config(tmp_path, "eval.dense.val_depth=''", "eval.dense.train_depth=''")
    result = evaluate_dense(PixelPatches(4), *open_dense_datasets(cfg.dense), cfg, torch.device("cpu"))
    assert result.depth is None
    scores = result.segmentation.scores
    # 4 classes: chance pixel accuracy 25% (20 images x 16 patches: one standard deviation ~2.4 points);
    # a random prediction's IoU per class is 1 / (2 x 4 - 1) = 14%
    assert 15.0 < scores["pixel_accuracy"] < 35.0, scores
    assert scores["miou"] < 22.0, scores


def test_predictions_are_scored_at_each_label_maps_own_size(tmp_path):
    # 2 x 2 blocks at 16 and 32 px, resized to 8 px for the backbone: one block per 4-px patch; the
    # masks stay at 16 or 32 px and the predictions are upsampled to them
    write_blocks(tmp_path, "train", 40, seed=4, block=8)
    write_blocks(tmp_path, "val", 6, seed=5, block=8)
    write_blocks(tmp_path / "big", "val", 3, seed=6, block=16, size=32)
    for folder in ("images", "masks", "depth"):
        for path in (tmp_path / "big" / "val" / folder).iterdir():
            path.rename(tmp_path / "val" / folder / f"big_{path.name}")
    cfg = dense_config(tmp_path, "eval.dense.image_size=8")
    result = evaluate_dense(PixelPatches(4), *open_dense_datasets(cfg.dense), cfg, torch.device("cpu"), n_pictures=9)
    assert result.segmentation.n_test == 9
    sizes = {picture["mask"][1].shape for picture in result.pictures}
    assert sizes == {(16, 16), (32, 32)}
    for picture in result.pictures:
        true, predicted = picture["mask"]
        assert true.shape == predicted.shape == picture["depth"][1].shape
    assert result.segmentation.scores["pixel_accuracy"] > 90.0, result.segmentation


def test_predict_upsamples_logits_to_the_requested_label_size():
    task = SegmentationTask(n_classes=3, ignore_index=255)
    logits = torch.zeros(2, 2, 3)
    logits[:, 0, 0], logits[:, 1, 2] = 5.0, 5.0  # left column: class 0, right column: class 2
    predicted = task.predict(logits, (6, 9))
    assert predicted.shape == (6, 9)
    assert (predicted[:, :4] == 0).all() and (predicted[:, 5:] == 2).all()


def test_backbone_features_of_the_last_four_layers_with_the_cls_token(tiny_student):
    torch.manual_seed(0)
    model = build_backbone({**tiny_student, "depth": 5}).eval()
    images = torch.randn(2, 3, 16, 16)
    features = BackbonePatches(model, "FOUR_LAST", use_cls_token=True)(images)
    assert features.shape == (2, 4, 4, 4 * 2 * 32)
    layers = model.get_intermediate_layers(images, n=4, reshape=True, return_class_token=True)
    patches, cls = layers[1]  # second of the four: columns 64-127 hold its patches, 128-191... its CLS
    torch.testing.assert_close(features[..., 64:96], patches.permute(0, 2, 3, 1))
    torch.testing.assert_close(features[1, 3, 2, 96:128], cls[1])
    last = BackbonePatches(model)(images)
    torch.testing.assert_close(last, model.forward_features(images)["x_norm_patchtokens"].reshape(2, 4, 4, 32))


@pytest.fixture
def bad_targets(tmp_path):
    write_blocks(tmp_path, "train", 12, seed=7)
    write_blocks(tmp_path, "val", 8, seed=8)
    val = tmp_path / "val"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(val / "masks" / "001.png")  # wrong size
    Image.fromarray(np.full((16, 16), 7, dtype=np.uint8)).save(val / "masks" / "002.png")  # label 7 of 3 classes
    (val / "masks" / "003.png").unlink()  # no mask
    Image.fromarray(np.full((16, 16), 255, dtype=np.uint8)).save(val / "masks" / "004.png")  # all ignored: fine
    (val / "images" / "005.png").write_bytes(b"not a png")  # undecodable image: skipped as everywhere
    return tmp_path


def test_bad_targets_stop_the_evaluation_with_counts_and_keys(bad_targets):
    cfg = dense_config(bad_targets, "eval.dense.train_depth=''", "eval.dense.val_depth=''", "eval.dense.epochs=1")
    with pytest.raises(DataError) as error:
        evaluate_dense(PixelPatches(4), *open_dense_datasets(cfg.dense), cfg, torch.device("cpu"))
    message = str(error.value)
    assert "3 of 8 images have bad targets" in message
    assert "1 x target size differs from the image" in message and "001 (mask 8x8, image 16x16)" in message
    assert "1 x label at or above num_classes" in message and "002 (label 7 with num_classes 3)" in message
    assert "1 x no target file" in message and "003" in message
    assert "skip_bad_targets" in message


def test_skipping_bad_targets_leaves_them_out_and_counts_them(bad_targets):
    cfg = dense_config(bad_targets, "eval.dense.train_depth=''", "eval.dense.val_depth=''", "eval.dense.epochs=1",
                       "eval.dense.skip_bad_targets=true")
    result = evaluate_dense(PixelPatches(4), *open_dense_datasets(cfg.dense), cfg, torch.device("cpu"))
    assert result.skipped["val"] == {"label at or above num_classes": 1, "no target file": 1,
                                     "target size differs from the image": 1, "unreadable image": 1}
    assert result.segmentation.n_test == 4


def test_masks_must_be_label_images_not_colour_pictures(tmp_path):
    write_blocks(tmp_path, "train", 4, seed=9)
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "train" / "masks" / "000.png")
    dataset = DenseDataset(tmp_path / "train" / "images", masks=tmp_path / "train" / "masks")
    with pytest.raises(Exception, match="RGB image, not a label mask"):
        dataset.load(0, n_classes=None)


def test_reduce_zero_label_ignores_zero_and_shifts_the_classes(tmp_path):
    write_blocks(tmp_path, "train", 1, seed=10)
    dataset = DenseDataset(tmp_path / "train" / "images", masks=tmp_path / "train" / "masks", reduce_zero_label=True)
    raw = np.asarray(Image.open(tmp_path / "train" / "masks" / "000.png"), dtype=np.int64)
    mask = dataset.load(0, n_classes=2).mask
    assert (mask[raw == 0] == 255).all() and (mask[raw > 0] == raw[raw > 0] - 1).all()


def test_dense_command_writes_the_report(blocks, tmp_path, tiny_student):
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pth"
    save_backbone(build_backbone(tiny_student), weights)
    out = tmp_path / "report"
    args = ["dense", "--weights", str(weights), "--out", str(out),
            "--train", str(blocks / "train" / "images"), "--train-masks", str(blocks / "train" / "masks"),
            "--train-depth", str(blocks / "train" / "depth"), "--val", str(blocks / "val" / "images"),
            "--val-masks", str(blocks / "val" / "masks"), "--val-depth", str(blocks / "val" / "depth"),
            "eval.dense.image_size=16", "eval.num_workers=0", "eval.dense.epochs=2", "eval.dense.lrs=[0.1]",
            "eval.dense.weight_decays=[0.0]", "eval.dense.n_pictures=2", "eval.dense.min_depth=0.5"]
    assert eval_main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert 0 <= report["dense"]["segmentation"]["scores"]["miou"] <= 100
    assert report["dense"]["depth"]["scores"]["rmse"] > 0
    html = (out / "report.html").read_text()
    assert "mIoU" in html and "RMSE" in html and html.count("data:image/png;base64,") == 1


def test_backbone_probe_restores_the_models_mode(blocks, tiny_student):
    cfg = dense_config(blocks, "eval.dense.epochs=1", "eval.dense.lrs=[0.1]")
    torch.manual_seed(0)
    model = build_backbone(tiny_student).train()
    result = evaluate_dense_backbone(model, *open_dense_datasets(cfg.dense), cfg, torch.device("cpu"))
    assert model.training and set(result.metrics()) == {
        "segmentation_miou", "segmentation_pixel_accuracy", "depth_rmse", "depth_delta1", "depth_abs_rel"}


WORKER = """
import json, sys, torch, torch.distributed as dist
from dinoscale.config import load_config
from dinoscale.eval.dense import evaluate_dense
from dinoscale.eval.patch_features import PixelPatches
from dinoscale.eval.dense_data import open_dense_datasets
dist.init_process_group("gloo")
cfg = load_config(None, json.loads(sys.argv[1])).eval
result = evaluate_dense(PixelPatches(4), *open_dense_datasets(cfg.dense), cfg, torch.device("cpu"))
if dist.get_rank() == 1:
    print(json.dumps(result.as_dict()))
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_score_the_same_as_one_process(tmp_path):
    write_blocks(tmp_path, "train", 15, seed=11)  # 15 and 7 images: the ranks hold uneven slices
    write_blocks(tmp_path, "val", 7, seed=12)
    (tmp_path / "val" / "masks" / "004.png").unlink()  # a problem found on the second rank only
    overrides = [*[f"eval.dense.{role}_{what}={tmp_path / role / folder}" for role in ("train", "val")
                   for what, folder in (("dataset", "images"), ("masks", "masks"), ("depth", "depth"))],
                 "eval.dense.image_size=16", "eval.num_workers=0", "eval.batch_size=2", "eval.precision=fp32",
                 "eval.dense.lrs=[0.1]", "eval.dense.weight_decays=[0.0]", "eval.dense.epochs=3",
                 "eval.dense.batch_size=4", "eval.dense.min_depth=0.5", "eval.dense.skip_bad_targets=true"]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script), json.dumps(overrides)],
                          check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, capture_output=True,
                          text=True)
    two_ranks = json.loads(done.stdout.strip().splitlines()[-1])
    cfg = load_config(None, overrides).eval
    single = evaluate_dense(PixelPatches(4), *open_dense_datasets(cfg.dense), cfg, torch.device("cpu")).as_dict()
    assert two_ranks["skipped"] == single["skipped"] == {"train": {}, "val": {"no target file": 1}}
    for probe in ("segmentation", "depth"):
        assert two_ranks[probe]["n_test"] == single[probe]["n_test"] == 6
    assert two_ranks["segmentation"]["scores"] == single["segmentation"]["scores"]  # integer confusion counts
    assert two_ranks["depth"]["scores"] == pytest.approx(single["depth"]["scores"], rel=1e-9)
