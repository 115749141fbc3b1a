"""Collate multi-crop samples into one SSL batch with iBOT masks (the reference's key names)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from dinoscale.data.masking import MaskingGenerator


def collate_data_and_cast(samples: Sequence[dict[str, Any]], mask_ratio_tuple: Sequence[float],
                          mask_probability: float, mask_generator: MaskingGenerator,
                          generator: torch.Generator, dtype: torch.dtype = torch.float32,
                          rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Stack the crops of `samples` (outputs of MultiCropAugmentation) crop-major and draw masks.

    Crops are ordered crop-major: rows [c*B:(c+1)*B] are crop c of the B images. Of the
    n_global*B global crops, int(n_global*B * mask_probability) get a mask; their ratios are spread
    over [min, max] as the reference does (the i-th draws uniformly in the i-th of equal sub-ranges)
    and the masks are shuffled over the crops.

    Under data parallelism the plan is made for the global batch (`world_size` ranks of B images,
    `generator` seeded alike on every rank) and each rank draws the masks of its own crops from
    per-crop generators, so the masks do not depend on how the batch is split across ranks.

    Returns collated_global_crops [n_global*B, 3, H, W], collated_local_crops [n_local*B, 3, h, w],
    collated_masks bool [n_global*B, n_patches of the mask grid], mask_indices_list (flat indices of masked tokens),
    masks_weight (per masked token, 1 / masked tokens of its crop), n_masked_patches (long [1]),
    upperbound (an upper bound of the masked-token count), and collated_gram_teacher_crops when
    the samples have gram-teacher crops.
    """
    batch: dict[str, Any] = {
        "collated_global_crops": _stack_crop_major(samples, "global_crops").to(dtype),
        "collated_local_crops": _stack_crop_major(samples, "local_crops").to(dtype),
    }
    if "gram_teacher_crops" in samples[0]:
        batch["collated_gram_teacher_crops"] = _stack_crop_major(samples, "gram_teacher_crops").to(dtype)

    n_images = len(samples)
    n_global_views = len(samples[0]["global_crops"])
    n_crops = n_global_views * n_images * world_size  # global batch, crop-major over all ranks' images
    n_tokens = mask_generator.num_patches
    n_masked_crops = int(n_crops * mask_probability)
    ratio_edges = torch.linspace(float(mask_ratio_tuple[0]), float(mask_ratio_tuple[1]), n_masked_crops + 1).tolist()
    band_of_slot = torch.full((n_crops,), -1, dtype=torch.long)
    band_of_slot[torch.randperm(n_crops, generator=generator)[:n_masked_crops]] = torch.arange(n_masked_crops)
    slot_seed = int(torch.randint(0, 2**62, (), generator=generator))
    masks, upperbound = [], 0
    for view in range(n_global_views):
        for image in range(rank * n_images, (rank + 1) * n_images):
            slot = view * n_images * world_size + image
            slot_generator = torch.Generator().manual_seed(slot_seed + slot)
            band = int(band_of_slot[slot])
            if band < 0:
                masks.append(mask_generator(0, slot_generator))
                continue
            low, high = ratio_edges[band], ratio_edges[band + 1]
            ratio = low + (high - low) * torch.rand((), generator=slot_generator).item()
            masks.append(mask_generator(int(n_tokens * ratio), slot_generator))
            upperbound += int(n_tokens * high)
    batch.update(mask_fields(torch.stack(masks).flatten(1)), upperbound=upperbound)
    return batch


def mask_fields(collated_masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch entries that follow from the masks [crops, patches]: collated_masks, the flat indices
    of the masked tokens, their weights (1 / masked tokens of their crop) and their count."""
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    per_crop_count = collated_masks.sum(dim=-1, keepdim=True).clamp(min=1)
    return {
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": (1.0 / per_crop_count).expand_as(collated_masks)[collated_masks],
        "n_masked_patches": torch.tensor([mask_indices_list.numel()], dtype=torch.long),
    }


def _stack_crop_major(samples: Sequence[dict[str, Any]], key: str) -> torch.Tensor:
    n_crops = len(samples[0][key])
    if n_crops == 0:
        return torch.empty(0)
    return torch.stack([sample[key][c] for c in range(n_crops) for sample in samples])
