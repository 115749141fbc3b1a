"""Multi-crop augmentation: crop counts, sizes, scale ranges, options and reproducibility."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dinoscale.config import load_config
from dinoscale.data.config import CropsConfig
from dinoscale.data.augment import (IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation, random_resized_crop_box,
                                    seeded_generator)
from dinoscale.errors import ConfigError


def noise_image(height: int = 48, width: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def constant_image(rgb=(200, 60, 30), size: int = 40) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


def normalised(rgb) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


def test_crop_counts_and_sizes():
    augment = MultiCropAugmentation(CropsConfig(local_crops_number=5, global_crops_size=32, local_crops_size=16))
    out = augment(noise_image(), seeded_generator(0))
    assert set(out) == {"global_crops", "local_crops"}
    assert [tuple(c.shape) for c in out["global_crops"]] == [(3, 32, 32)] * 2
    assert [tuple(c.shape) for c in out["local_crops"]] == [(3, 16, 16)] * 5
    assert all(c.dtype == torch.float32 for c in out["global_crops"] + out["local_crops"])


def test_from_config_uses_the_crops_section():
    cfg = load_config(None, ["crops.local_crops_number=3", "crops.global_crops_size=24", "crops.local_crops_size=8",
                             "crops.gram_teacher_crops_size=48", "student.patch_size=8"])
    out = MultiCropAugmentation(cfg.crops, cfg.student.patch_size)(noise_image(), seeded_generator(1))
    assert [c.shape[-1] for c in out["global_crops"]] == [24, 24]
    assert [c.shape[-1] for c in out["local_crops"]] == [8, 8, 8]
    assert [c.shape[-1] for c in out["gram_teacher_crops"]] == [48, 48]


@pytest.mark.parametrize("scale", [(0.32, 1.0), (0.05, 0.32)])
def test_random_resized_crop_area_and_aspect_ranges(scale):
    height, width = 300, 400
    areas, generator = [], seeded_generator(2)
    for _ in range(500):
        top, left, h, w = random_resized_crop_box(height, width, scale, generator)
        assert 0 <= top <= height - h and 0 <= left <= width - w
        # rounding of h and w to whole pixels moves the area by at most one row/column
        fraction = h * w / (height * width)
        slack = (h + w + 1) / (height * width)
        assert scale[0] - slack <= fraction <= scale[1] + slack
        assert 3 / 4 - 2 / min(h, w) <= w / h <= 4 / 3 + 2 / min(h, w)
        areas.append(fraction)
    # the draws cover the range, not just one end of it
    assert min(areas) < scale[0] + 0.2 * (scale[1] - scale[0]) and max(areas) > scale[1] - 0.2 * (scale[1] - scale[0])


def test_crop_falls_back_to_centre_for_extreme_aspect_ratios():
    top, left, h, w = random_resized_crop_box(10, 1000, (0.9, 1.0), seeded_generator(3))
    assert (h, w) == (10, round(10 * 4 / 3)) and top == 0 and left == (1000 - w) // 2


def test_same_seed_same_crops_other_seed_other_crops():
    augment = MultiCropAugmentation(CropsConfig(local_crops_number=2, global_crops_size=24, local_crops_size=12))
    image = noise_image()
    first, again = augment(image, seeded_generator(7, 1)), augment(image, seeded_generator(7, 1))
    other = augment(image, seeded_generator(7, 2))
    for key in ("global_crops", "local_crops"):
        assert all(torch.equal(a, b) for a, b in zip(first[key], again[key]))
    assert not torch.equal(first["global_crops"][0], other["global_crops"][0])


def test_gram_crops_without_distortions_are_the_plain_normalised_view():
    """A constant image stays constant under crops and resizes: the undistorted Gram crop is its colour."""
    rgb = (200, 60, 30)
    augment = MultiCropAugmentation(CropsConfig(local_crops_number=0, global_crops_size=16, local_crops_size=8,
                                                gram_teacher_crops_size=32, gram_teacher_no_distortions=True))
    for seed in range(5):
        out = augment(constant_image(rgb), seeded_generator(seed))
        for crop in out["gram_teacher_crops"]:
            assert crop.shape == (3, 32, 32)
            torch.testing.assert_close(crop, normalised(rgb).view(3, 1, 1).expand_as(crop), atol=1e-5, rtol=0)


def test_global_crops_are_photometrically_distorted():
    """The second global crop is distorted in most draws (jitter p=0.8, grayscale, solarisation)."""
    rgb = (200, 60, 30)
    augment = MultiCropAugmentation(CropsConfig(local_crops_number=0, global_crops_size=16, local_crops_size=8))
    changed = sum(not torch.allclose(augment(constant_image(rgb), seeded_generator(s))["global_crops"][1],
                                     normalised(rgb).view(3, 1, 1).expand(3, 16, 16), atol=1e-3)
                  for s in range(20))
    assert changed >= 12


def test_shared_colour_jitter_gives_every_crop_the_same_colour():
    """With one jitter per image, crops of a constant image differ only by solarisation (2nd global)."""
    augment = MultiCropAugmentation(CropsConfig(local_crops_number=4, global_crops_size=16, local_crops_size=8,
                                                share_color_jitter=True))
    for seed in range(5):
        out = augment(constant_image(), seeded_generator(seed))
        reference = out["global_crops"][0][:, 0, 0]
        for crop in out["local_crops"]:
            torch.testing.assert_close(crop[:, 0, 0], reference, atol=1e-5, rtol=0)
    unshared = MultiCropAugmentation(CropsConfig(local_crops_number=4, global_crops_size=16, local_crops_size=8))
    out = unshared(constant_image(), seeded_generator(0))
    colours = {tuple(c[:, 0, 0].tolist()) for c in out["local_crops"]}
    assert len(colours) > 1


def test_local_crops_inside_global_crops_are_patch_aligned_windows():
    augment = MultiCropAugmentation(CropsConfig(local_crops_number=4, global_crops_size=32, local_crops_size=16,
                                                localcrops_subset_of_globalcrops=True), patch_size=8)
    out = augment(noise_image(), seeded_generator(4))
    assert [tuple(c.shape) for c in out["local_crops"]] == [(3, 16, 16)] * 4
    with pytest.raises(ConfigError, match="local_crops_size"):
        MultiCropAugmentation(CropsConfig(global_crops_size=16, local_crops_size=32,
                                          localcrops_subset_of_globalcrops=True))


@pytest.mark.parametrize("scale", [(0.0, 0.5), (0.5, 0.2), (0.1, 1.5)])
def test_bad_scale_is_a_config_error(scale):
    with pytest.raises(ConfigError, match="global_crops_scale"):
        MultiCropAugmentation(CropsConfig(global_crops_scale=scale))


def test_blur_probability_one_on_first_global_crop():
    """Gaussian blur with p=1.0 smooths the first global crop of a noise image more than the second
    (p=0.1) on average (at 112 px the blur radius is half the recipe's 0.1-2 px)."""
    augment = MultiCropAugmentation(CropsConfig(local_crops_number=0, global_crops_size=112, local_crops_size=8,
                                                global_crops_scale=(1.0, 1.0), horizontal_flips=False))

    def roughness(crop: torch.Tensor) -> float:
        return float((crop[:, :, 1:] - crop[:, :, :-1]).abs().mean() / (crop.std() + 1e-6))

    first = second = 0.0
    for seed in range(12):
        out = augment(noise_image(112, 112, seed), seeded_generator(seed))
        first += roughness(out["global_crops"][0])
        second += roughness(out["global_crops"][1])
    assert first < 0.8 * second
    assert math.isfinite(first)


def _first_global_hue(augment: MultiCropAugmentation, seed: int) -> float:
    """Hue in [0, 1) of the first global crop of a constant image (no solarisation on that crop)."""
    crop = augment(constant_image(), seeded_generator(seed))["global_crops"][0]
    rgb = (crop[:, 0, 0] * torch.tensor(IMAGENET_STD) + torch.tensor(IMAGENET_MEAN)).clamp(0, 1)
    return colorsys.rgb_to_hsv(*rgb.tolist())[0]


def test_colour_jitter_strengths_come_from_the_config():
    """Hue jitter h shifts the hue by at most h of the colour circle; 0.5 reaches every hue."""
    original = colorsys.rgb_to_hsv(200 / 255, 60 / 255, 30 / 255)[0]

    def hue_shifts(overrides: list[str]) -> list[float]:
        cfg = load_config(None, ["crops.color_jitter_probability=1", "crops.grayscale_probability=0",
                                 "crops.color_jitter_brightness=0", "crops.color_jitter_contrast=0",
                                 "crops.color_jitter_saturation=0", "crops.local_crops_number=0",
                                 "crops.global_crops_size=8", *overrides])
        augment = MultiCropAugmentation(cfg.crops, cfg.student.patch_size)
        return [abs((_first_global_hue(augment, s) - original + 0.5) % 1 - 0.5) for s in range(40)]

    assert max(hue_shifts(["crops.color_jitter_hue=0.1"])) <= 0.1 + 0.01
    assert max(hue_shifts(["crops.color_jitter_hue=0.5"])) > 0.3


def test_grayscale_probability_one_makes_every_crop_grey():
    cfg = load_config(None, ["crops.grayscale_probability=1", "crops.local_crops_number=3",
                             "crops.global_crops_size=16", "crops.local_crops_size=8"])
    out = MultiCropAugmentation(cfg.crops, cfg.student.patch_size)(noise_image(), seeded_generator(0))
    for crop in out["global_crops"] + out["local_crops"]:
        pixels = crop * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        torch.testing.assert_close(pixels[0], pixels[1], atol=2e-2, rtol=0)
        torch.testing.assert_close(pixels[1], pixels[2], atol=2e-2, rtol=0)
