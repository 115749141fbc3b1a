"""iBOT block masks and the SSL collate function."""

from __future__ import annotations

import pytest
import torch

from dinoscale.data.collate import collate_data_and_cast
from dinoscale.data.masking import MaskingGenerator


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("grid,target", [((14, 14), 0), ((14, 14), 19), ((14, 14), 98), ((4, 4), 1),
                                         ((4, 4), 3), ((4, 4), 8), ((3, 5), 7)])
def test_mask_has_exactly_the_requested_number_of_patches(grid, target):
    generator = MaskingGenerator(grid, max_num_patches=0.5 * grid[0] * grid[1])
    for seed in range(5):
        mask = generator(target, gen(seed))
        assert mask.shape == grid and mask.dtype == torch.bool
        assert int(mask.sum()) == target


def test_masks_are_made_of_blocks():
    """Blocks of >= 4 patches: most masked patches have a masked 4-neighbour (random pixels would not)."""
    generator = MaskingGenerator((14, 14), max_num_patches=98, min_num_patches=4)
    with_neighbour = total = 0
    for seed in range(10):
        mask = generator(60, gen(seed))
        padded = torch.nn.functional.pad(mask, (1, 1, 1, 1))
        neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        with_neighbour += int((mask & neighbours).sum())
        total += int(mask.sum())
    assert with_neighbour / total > 0.95


def test_masks_are_reproducible_from_the_generator_seed():
    generator = MaskingGenerator((8, 8), max_num_patches=32)
    assert torch.equal(generator(20, gen(3)), generator(20, gen(3)))
    assert not all(torch.equal(generator(20, gen(3)), generator(20, gen(s))) for s in range(4, 8))


def fake_samples(batch: int, n_local: int, gram: bool = False) -> list[dict]:
    """Crops whose value encodes (sample, crop) so the stacking order can be checked."""
    samples = []
    for b in range(batch):
        sample = {"global_crops": [torch.full((3, 8, 8), 100.0 * g + b) for g in range(2)],
                  "local_crops": [torch.full((3, 4, 4), 100.0 * c + b) for c in range(n_local)]}
        if gram:
            sample["gram_teacher_crops"] = [torch.full((3, 12, 12), 100.0 * g + b) for g in range(2)]
        samples.append(sample)
    return samples


def test_collate_stacks_crops_crop_major():
    batch = collate_data_and_cast(fake_samples(3, 2, gram=True), (0.1, 0.5), 0.5, MaskingGenerator(2, 2),
                                  gen(0))
    expected_global = [100.0 * g + b for g in range(2) for b in range(3)]
    assert batch["collated_global_crops"][:, 0, 0, 0].tolist() == expected_global
    assert batch["collated_local_crops"][:, 0, 0, 0].tolist() == expected_global
    assert batch["collated_gram_teacher_crops"].shape == (6, 3, 12, 12)


@pytest.mark.parametrize("probability", [0.5, 0.25, 1.0])
def test_mask_ratios_and_masked_fraction(probability):
    batch_size, side, ratio_range = 16, 8, (0.1, 0.5)
    n_patches = side * side
    batch = collate_data_and_cast(fake_samples(batch_size, 0), ratio_range, probability,
                                  MaskingGenerator(side, max_num_patches=0.5 * n_patches), gen(1))
    masks = batch["collated_masks"]
    n_crops = 2 * batch_size
    assert masks.shape == (n_crops, n_patches)
    counts = masks.sum(dim=1)
    n_masked = int(n_crops * probability)
    assert int((counts > 0).sum()) == n_masked
    # the i-th masked crop draws its ratio in the i-th of n_masked equal slices of the range
    edges = torch.linspace(*ratio_range, n_masked + 1)
    masked_counts = sorted(counts[counts > 0].tolist())
    for i, count in enumerate(masked_counts):
        assert int(n_patches * edges[i]) <= count <= int(n_patches * edges[i + 1])
    assert batch["upperbound"] >= int(counts.sum())


def test_mask_indices_weights_and_counts_follow_the_masks():
    batch = collate_data_and_cast(fake_samples(8, 1), (0.1, 0.5), 0.5, MaskingGenerator(6, max_num_patches=18),
                                  gen(2))
    masks = batch["collated_masks"]
    indices, weights = [], []
    for crop in range(masks.shape[0]):
        for patch in range(masks.shape[1]):
            if masks[crop, patch]:
                indices.append(crop * masks.shape[1] + patch)
                weights.append(1.0 / int(masks[crop].sum()))
    assert batch["mask_indices_list"].tolist() == indices
    torch.testing.assert_close(batch["masks_weight"], torch.tensor(weights))
    assert batch["n_masked_patches"].tolist() == [len(indices)]
    # every masked crop's weights sum to one
    assert float(batch["masks_weight"].sum()) == pytest.approx(int((masks.sum(1) > 0).sum()), rel=1e-6)


def test_collate_is_reproducible_and_casts():
    samples = fake_samples(4, 2)
    first = collate_data_and_cast(samples, (0.1, 0.5), 0.5, MaskingGenerator(4, max_num_patches=8), gen(5),
                                  dtype=torch.bfloat16)
    second = collate_data_and_cast(samples, (0.1, 0.5), 0.5, MaskingGenerator(4, max_num_patches=8), gen(5))
    assert first["collated_global_crops"].dtype == torch.bfloat16
    assert torch.equal(first["collated_masks"], second["collated_masks"])
