"""Multi-crop augmentation (DINOv2 recipe, DINOv3 options), reproducible from a torch.Generator.

Every random choice is drawn from the generator passed with the image, so a sample's crops
depend only on (image, generator seed): give each sample its own `seeded_generator(seed, step,
index)` and a resumed run sees the same crops. Geometric and photometric operations run on PIL
images (PIL's C code; torchvision's tensor-side hue conversion is much slower), normalisation last.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms.v2 import InterpolationMode

from dinoscale.data.config import CropsConfig
from dinoscale.data.crop_sizes import SIZE_KEYS
from dinoscale.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = InterpolationMode.BICUBIC
BLUR_SIGMA = (0.1, 2.0)
# the recipe's blur radii are pixels of 224-px global and 96-px local crops; other sizes scale them
RECIPE_GLOBAL_SIZE, RECIPE_LOCAL_SIZE = 224, 96
ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative integer keys (e.g. seed, iteration, sample index)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded with `derive_seed(*keys)`."""
    return torch.Generator().manual_seed(derive_seed(*keys))


def _rand(generator: torch.Generator) -> float:
    return torch.rand((), generator=generator).item()


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * _rand(generator)


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Integer in [low, high], both included."""
    return int(torch.randint(low, high + 1, (), generator=generator).item())


def random_resized_crop_box(height: int, width: int, scale: Sequence[float], generator: torch.Generator,
                            ratio: Sequence[float] = ASPECT_RATIO_RANGE) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering a `scale` fraction of the area with an aspect ratio in `ratio`
    (torchvision's RandomResizedCrop sampling: 10 tries, then a centre crop)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(*log_ratio, generator))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(0, height - h, generator), _randint(0, width - w, generator), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _check_scale(name: str, scale: Sequence[float]) -> tuple[float, float]:
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"crops.{name} = {list(scale)} must be [min, max] with 0 < min <= max <= 1")
    return float(scale[0]), float(scale[1])


class ColorJitter:
    """Draws and applies DINOv2's colour distortion: jitter (p=0.8, random order) then grayscale (p=0.2);
    strengths and probabilities are the `crops.color_jitter_*` and `crops.grayscale_probability` knobs."""

    def __init__(self, crops: CropsConfig):
        self.brightness, self.contrast = crops.color_jitter_brightness, crops.color_jitter_contrast
        self.saturation, self.hue = crops.color_jitter_saturation, crops.color_jitter_hue
        self.jitter_probability, self.grayscale_probability = crops.color_jitter_probability, crops.grayscale_probability

    def __call__(self, image: Image.Image, generator: torch.Generator) -> Image.Image:
        if _rand(generator) < self.jitter_probability:
            ops = [
                (TF.adjust_brightness, _uniform(1 - self.brightness, 1 + self.brightness, generator)),
                (TF.adjust_contrast, _uniform(1 - self.contrast, 1 + self.contrast, generator)),
                (TF.adjust_saturation, _uniform(1 - self.saturation, 1 + self.saturation, generator)),
                (TF.adjust_hue, _uniform(-self.hue, self.hue, generator)),
            ]
            for i in torch.randperm(len(ops), generator=generator).tolist():
                op, factor = ops[i]
                image = op(image, factor)
        if _rand(generator) < self.grayscale_probability:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        return image


def _maybe_blur(image: Image.Image, probability: float, radius_scale: float, generator: torch.Generator) -> Image.Image:
    if _rand(generator) >= probability:
        return image
    return image.filter(ImageFilter.GaussianBlur(radius=radius_scale * _uniform(*BLUR_SIGMA, generator)))


def _maybe_solarize(image: Image.Image, probability: float, generator: torch.Generator) -> Image.Image:
    return ImageOps.solarize(image, threshold=128) if _rand(generator) < probability else image


class MultiCropAugmentation:
    """Two global crops, `local_crops_number` local crops and optionally two Gram-teacher crops.

    DINOv2 recipe: RandomResizedCrop (bicubic) + horizontal flip; colour jitter and grayscale
    (`crops.color_jitter_*`, the recipe's strengths by default);
    Gaussian blur with p=1.0 (first global), 0.1 (second global), 0.5 (locals), radius 0.1-2 px at
    224/96 px and proportionally less on smaller crops (a 2-px blur wipes out a 32-px crop's
    texture); solarisation with p=0.2 on the second global crop; ImageNet normalisation.
    DINOv3 options: `gram_teacher_crops_size` (the global crops are cut once at the larger size; the
    Gram crops are the same views resized, without photometric distortions when
    `gram_teacher_no_distortions`), `localcrops_subset_of_globalcrops` (local crops are
    patch-aligned windows of the global crops, alternating between the two), and
    `share_color_jitter` (one colour distortion applied to the whole image before cropping).
    """

    def __init__(self, crops: CropsConfig | None = None, patch_size: int = 16, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        # a plain dataclass: reading a DictConfig node per crop would slow the data loader down
        crops = OmegaConf.to_object(crops) if isinstance(crops, DictConfig) else crops or CropsConfig()
        if any(isinstance(getattr(crops, key), (list, tuple)) for key in SIZE_KEYS):
            raise ValueError("MultiCropAugmentation takes one crop-size triple; with lists of crop sizes build one "
                             "per triple (CropSizePlan.crops_of)")
        self.crops = dataclasses.replace(
            crops, global_crops_scale=_check_scale("global_crops_scale", crops.global_crops_scale),
            local_crops_scale=_check_scale("local_crops_scale", crops.local_crops_scale))
        self.flip_probability = 0.5 if self.crops.horizontal_flips else 0.0
        self.patch_size = patch_size
        # normalisation as one multiply-subtract on the uint8 values: (x / 255 - mean) / std
        self._pixel_scale = (1.0 / (255.0 * torch.tensor(std, dtype=torch.float32))).view(-1, 1, 1)
        self._pixel_shift = (torch.tensor(mean, dtype=torch.float32) / torch.tensor(std, dtype=torch.float32)).view(-1, 1, 1)
        self.color_jitter = ColorJitter(self.crops)
        if self.crops.localcrops_subset_of_globalcrops and self.crops.local_crops_size > self.crops.global_crops_size:
            raise ConfigError(f"crops.local_crops_size = {self.crops.local_crops_size} must not exceed "
                              f"crops.global_crops_size = {self.crops.global_crops_size} when "
                              "crops.localcrops_subset_of_globalcrops is true")

    def __call__(self, image: Image.Image, generator: torch.Generator) -> dict[str, list[torch.Tensor]]:
        """Crops of one RGB image as normalised float tensors [3, size, size]:
        {"global_crops": [2], "local_crops": [n], "gram_teacher_crops": [2] when configured}."""
        pixels = image.convert("RGB")
        if self.crops.share_color_jitter:
            pixels = self.color_jitter(pixels, generator)
        base_size = max(self.crops.global_crops_size, self.crops.gram_teacher_crops_size or 0)
        bases = [self._geometric(pixels, self.crops.global_crops_scale, base_size, generator) for _ in range(2)]
        output: dict[str, list[torch.Tensor]] = {"global_crops": [], "local_crops": []}
        gram_crops = []
        for index, base in enumerate(bases):
            if self.crops.gram_teacher_crops_size is not None and self.crops.gram_teacher_no_distortions:
                gram_crops.append(self._normalize(self._resize(base, self.crops.gram_teacher_crops_size)))
                base = self._resize(base, self.crops.global_crops_size)
                bases[index] = base
            distorted = self._global_distortions(base, index, generator)
            if self.crops.gram_teacher_crops_size is not None and not self.crops.gram_teacher_no_distortions:
                gram_crops.append(self._normalize(self._resize(distorted, self.crops.gram_teacher_crops_size)))
            output["global_crops"].append(self._normalize(self._resize(distorted, self.crops.global_crops_size)))
        if gram_crops:
            output["gram_teacher_crops"] = gram_crops
        for index in range(self.crops.local_crops_number):
            if self.crops.localcrops_subset_of_globalcrops:
                local = self._window_of(self._resize(bases[index % 2], self.crops.global_crops_size), generator)
            else:
                local = self._geometric(pixels, self.crops.local_crops_scale, self.crops.local_crops_size, generator)
            output["local_crops"].append(self._normalize(self._local_distortions(local, generator)))
        return output

    def _geometric(self, pixels: Image.Image, scale: tuple[float, float], size: int,
                   generator: torch.Generator) -> Image.Image:
        top, left, h, w = random_resized_crop_box(pixels.height, pixels.width, scale, generator)
        crop = TF.resized_crop(pixels, top, left, h, w, [size, size], interpolation=BICUBIC, antialias=True)
        return TF.horizontal_flip(crop) if _rand(generator) < self.flip_probability else crop

    def _window_of(self, global_view: Image.Image, generator: torch.Generator) -> Image.Image:
        """A patch-aligned local_crops_size window of a global view (DINOv3's local-inside-global crops)."""
        steps = (self.crops.global_crops_size - self.crops.local_crops_size) // self.patch_size
        top, left = (_randint(0, steps, generator) * self.patch_size for _ in range(2))
        return global_view.crop((left, top, left + self.crops.local_crops_size, top + self.crops.local_crops_size))

    def _global_distortions(self, view: Image.Image, index: int, generator: torch.Generator) -> Image.Image:
        if not self.crops.share_color_jitter:
            view = self.color_jitter(view, generator)
        radius_scale = self.crops.global_crops_size / RECIPE_GLOBAL_SIZE
        if index == 0:
            return _maybe_blur(view, 1.0, radius_scale, generator)
        return _maybe_solarize(_maybe_blur(view, 0.1, radius_scale, generator), 0.2, generator)

    def _local_distortions(self, view: Image.Image, generator: torch.Generator) -> Image.Image:
        if not self.crops.share_color_jitter:
            view = self.color_jitter(view, generator)
        return _maybe_blur(view, 0.5, self.crops.local_crops_size / RECIPE_LOCAL_SIZE, generator)

    @staticmethod
    def _resize(view: Image.Image, size: int) -> Image.Image:
        if view.size == (size, size):
            return view
        return view.resize((size, size), Image.Resampling.BICUBIC)

    def _normalize(self, view: Image.Image) -> torch.Tensor:
        return TF.pil_to_tensor(view).float().mul_(self._pixel_scale).sub_(self._pixel_shift)
