"""Mixed-resolution crops: the per-step (global, local, Gram-teacher) triple, the same on every rank and
after a resume, drawn with the configured probabilities; masks and Gram crops follow it; bad sizes stop."""

import math
import re

import pytest
import torch

from dinoscale.cli import main
from dinoscale.config import load_config
from dinoscale.data.crop_sizes import CropSizePlan, CropSizes
from dinoscale.data.stream import build_stream
from dinoscale.data.synthetic import SyntheticSpec, make_synthetic_pool
from dinoscale.errors import ConfigError

MIXED = ["crops.global_crops_size=[16,32]", "crops.local_crops_size=[8,16]", "crops.gram_teacher_crops_size=[32,48]",
         "crops.global_local_crop_pairs_ratios=[0.4,0.6]"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("crop_sizes")
    make_synthetic_pool(root, SyntheticSpec(n_images=24, image_size=24, eval_per_class=1, n_corrupt=0))
    return root / "pool"


def _config(pool, *overrides):
    return load_config(None, ["student.patch_size=8", "student.img_size=16", "crops.local_crops_number=1",
                              "train.batch_size_per_gpu=4", f"train.dataset_path={pool}", *MIXED, *overrides])


def _sizes(batch):
    return (batch["collated_global_crops"].shape[-1], batch["collated_local_crops"].shape[-1],
            batch["collated_gram_teacher_crops"].shape[-1])


def test_a_single_size_is_one_triple_used_at_every_step():
    crops = load_config(None, ["crops.global_crops_size=32", "crops.local_crops_size=16"]).crops
    plan = CropSizePlan.from_config(crops, patch_size=16)
    assert plan.triples == (CropSizes(32, 16, None),) and plan.ratios == (1.0,)
    assert {plan.index_at(seed, step) for seed in range(3) for step in range(100)} == {0}


def test_a_single_size_stands_for_every_triple_of_the_lists():
    crops = load_config(None, ["crops.global_crops_size=[32,64]", "crops.local_crops_size=16",
                               "crops.global_local_crop_pairs_ratios=[0.5,0.5]"]).crops
    assert CropSizePlan.from_config(crops, 16).triples == (CropSizes(32, 16, None), CropSizes(64, 16, None))


def test_the_triples_are_drawn_with_the_configured_probabilities():
    ratios = [0.3, 0.3, 0.3, 0.05, 0.05]  # DINOv3's high-resolution adaptation
    crops = load_config(None, ["crops.global_crops_size=[512,768,768,768,768]",
                               "crops.local_crops_size=[112,112,160,224,336]",
                               "crops.gram_teacher_crops_size=[768,1152,1152,1152,1152]",
                               f"crops.global_local_crop_pairs_ratios={ratios}"]).crops
    plan = CropSizePlan.from_config(crops, 16)
    n_steps = 20000
    counts = torch.bincount(torch.tensor([plan.index_at(0, step) for step in range(n_steps)]), minlength=5)
    for count, p in zip(counts.tolist(), ratios):  # each count is Binomial(n_steps, p): within 4 standard deviations
        assert abs(count - n_steps * p) < 4 * math.sqrt(n_steps * p * (1 - p)), (counts, ratios)
    assert plan.at(0, 7) == plan.triples[plan.index_at(0, 7)]


def test_every_rank_and_a_resumed_stream_use_the_same_triple_at_each_step(pool):
    cfg = _config(pool)
    steps = range(3, 11)
    one_rank = [_sizes(build_stream(cfg, 0, 1, 0).batch(step)) for step in steps]
    # the draw is a function of (seed, step): 2 ranks, and a stream resumed at step 6, agree with one rank
    for rank in (0, 1):
        assert [_sizes(build_stream(cfg, rank, 2, 0).batch(step)) for step in steps] == one_rank
    resumed = build_stream(cfg, 1, 2, start_step=6)
    assert [_sizes(batch) for batch, _ in zip(resumed, range(6, 11))] == one_rank[3:]
    # the drawn triples are those of the definition: ratios 0.4 / 0.6 over (16, 8, 32) and (32, 16, 48)
    assert set(one_rank) == {(16, 8, 32), (32, 16, 48)}
    other_seed = [_sizes(build_stream(_config(pool, "seed=1"), 0, 1, 0).batch(step)) for step in steps]
    assert other_seed != one_rank


def test_masks_follow_the_drawn_global_size(pool):
    cfg = _config(pool, "ibot.mask_sample_probability=1.0")
    stream = build_stream(cfg, 0, 1, 0)
    seen = set()
    for step in range(8):
        batch = stream.batch(step)
        side = batch["collated_global_crops"].shape[-1] // 8
        seen.add(side)
        n_crops = batch["collated_global_crops"].shape[0]
        assert batch["collated_masks"].shape == (n_crops, side * side)
        masked = batch["collated_masks"].sum(dim=1).float() / (side * side)
        low, high = cfg.ibot.mask_ratio_min_max
        assert ((masked >= math.floor(low * side * side) / (side * side)) & (masked <= high)).all()
        assert batch["collated_gram_teacher_crops"].shape[0] == n_crops
    assert seen == {2, 4}


@pytest.mark.parametrize("overrides, message", [
    (["crops.local_crops_size=[8,16,24]"], "crop-size lists of unequal length (crops.global_crops_size has 2, "
                                           "crops.local_crops_size has 3, crops.gram_teacher_crops_size has 2"),
    (["crops.global_local_crop_pairs_ratios=[1.0]"], "crops.global_local_crop_pairs_ratios has 1 entries for 2"),
    (["crops.global_local_crop_pairs_ratios=[0.5,0.6]"], "sums to 1.1, not 1"),
    (["crops.global_local_crop_pairs_ratios=[1.5,-0.5]"], "must hold probabilities"),
    (["crops.local_crops_size=[8,12]"], "crops.local_crops_size = 12 is not a multiple of student.patch_size = 8; "
                                        "use 8 or 16"),
    (["crops.gram_teacher_crops_size=[32,50]"], "crops.gram_teacher_crops_size = 50 is not a multiple"),
    (["crops.global_crops_size=[16,0]"], "crops.global_crops_size has 0, which is not a positive whole number"),
])
def test_bad_crop_sizes_raise_a_config_error_naming_the_key(pool, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        CropSizePlan.from_config(_config(pool, *overrides).crops, 8)


def test_train_stops_with_one_line_before_any_work(pool, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "train/small_pool", f"train.dataset_path={pool}", f"train.output_dir={out}", *MIXED,
                 "crops.global_local_crop_pairs_ratios=[0.5,0.4]"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "sums to 0.9, not 1" in lines[0]
    assert not out.exists()
