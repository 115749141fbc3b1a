"""iBOT block-wise masks on the patch grid, drawn from a torch.Generator (reproducible per batch)."""

from __future__ import annotations

import math

import torch

from dinoscale.errors import ConfigError


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Integer in [low, high] (both included)."""
    return int(torch.randint(low, high + 1, (), generator=generator).item())


class MaskingGenerator:
    """Masks of rectangular blocks covering an exact number of patches of an (height, width) grid.

    Blocks of `min_num_patches`..`max_num_patches` patches with aspect ratios in
    [min_aspect, 1/min_aspect] are placed at random until the requested count is reached (BEiT /
    DINOv2). Unlike the reference, which may stop short on small grids, a remainder smaller than
    `min_num_patches` is filled with smaller blocks, down to single patches, so a mask always has
    exactly the requested number of patches.
    """

    def __init__(self, input_size: int | tuple[int, int], max_num_patches: float | None = None,
                 min_num_patches: int = 4, min_aspect: float = 0.3, max_aspect: float | None = None):
        self.height, self.width = (input_size, input_size) if isinstance(input_size, int) else input_size
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = self.num_patches if max_num_patches is None else max_num_patches
        if min_aspect <= 0:
            raise ConfigError(f"ibot.mask_min_aspect = {min_aspect} must be > 0")
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __call__(self, num_masking_patches: int, generator: torch.Generator) -> torch.Tensor:
        """A bool mask [height, width] with exactly min(num_masking_patches, grid size) True entries."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        target = min(int(num_masking_patches), self.num_patches)
        count = 0
        while count < target:
            budget = min(target - count, self.max_num_patches)
            added = self._add_block(mask, budget, generator)
            if added == 0:
                added = self._add_single_patch(mask, generator)
            count += added
        return mask

    def _add_block(self, mask: torch.Tensor, budget: float, generator: torch.Generator) -> int:
        """Mask one random block adding between 1 and `budget` new patches; 0 if 10 tries fail."""
        min_area = min(self.min_num_patches, budget)
        for _ in range(10):
            area = _uniform(min_area, budget, generator)
            aspect = math.exp(_uniform(*self.log_aspect_ratio, generator))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (0 < h < self.height and 0 < w < self.width):
                continue
            top = _randint(0, self.height - h, generator)
            left = _randint(0, self.width - w, generator)
            block = mask[top:top + h, left:left + w]
            new = h * w - int(block.sum())
            if 0 < new <= budget:
                block.fill_(True)
                return new
        return 0

    def _add_single_patch(self, mask: torch.Tensor, generator: torch.Generator) -> int:
        free = (~mask).flatten().nonzero().flatten()
        pick = free[_randint(0, len(free) - 1, generator)]
        mask.view(-1)[pick] = True
        return 1
