import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from dinoscale.data.pool import open_pool
from dinoscale.data.stream import BatchStream, BlockShuffle, Source, allocate, make_loader


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    made = []
    for name, n in (("a", 24), ("b", 10)):
        root = tmp_path_factory.mktemp(name)
        for i in range(n):
            Image.new("RGB", (16, 16), (i, 100 if name == "a" else 200, 0)).save(root / f"{i:03d}.png")
        made.append(open_pool(root))
    return made


def identify(image, generator):
    """A sample that names its image (red = index, green = source) plus one random draw."""
    r, g, _ = image.getpixel((0, 0))
    return torch.tensor([r, g, torch.randint(0, 10**6, (), generator=generator).item()])


def stack(samples, generator):
    return {"items": torch.stack(samples), "mask_draw": torch.rand(3, generator=generator)}


def _stream(pools, rank=0, world=1, start=0, batch=4, weights=(1.0,), homogeneous=0.0):
    sources = [Source(p, w) for p, w in zip(pools, weights)]
    return BatchStream(sources, batch, rank, world, seed=3, start_step=start, make_sample=[identify], collate=[stack],
                       homogeneous_batch_fraction=homogeneous)


@pytest.mark.parametrize("n_items, block", [(10, 4), (12, 4), (1, 4), (50, 7)])
def test_block_shuffle_is_a_fresh_permutation_each_epoch(n_items, block):
    shuffle = BlockShuffle(n_items, seed=1, block=block)
    epochs = [[shuffle(e * n_items + i) for i in range(n_items)] for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(n_items))
    if n_items > 4:
        assert epochs[0] != epochs[1]


def test_resume_sees_exactly_the_same_batches(pools):
    full = list(itertools.islice(iter(_stream(pools[:1])), 8))
    resumed = list(itertools.islice(iter(_stream(pools[:1], start=5)), 3))
    for a, b in zip(full[5:], resumed):
        assert a["step"] == b["step"]
        assert torch.equal(a["items"], b["items"]) and torch.equal(a["mask_draw"], b["mask_draw"])


def test_workers_do_not_change_the_batches(pools):
    serial = list(itertools.islice(iter(make_loader(_stream(pools[:1]), 0)), 5))
    parallel = list(itertools.islice(iter(make_loader(_stream(pools[:1]), 2)), 5))
    assert [b["step"] for b in parallel] == list(range(5))
    for a, b in zip(serial, parallel):
        assert torch.equal(a["items"], b["items"])


def test_ranks_split_each_epoch_exactly(pools):
    # 24 items, 2 ranks x 4 images: 3 steps are one epoch; every item appears once
    seen = []
    for rank in range(2):
        stream = _stream(pools[:1], rank=rank, world=2)
        seen += [int(x) for step in range(3) for x in stream.batch(step)["items"][:, 0]]
    assert sorted(seen) == list(range(24))


def test_sources_mix_by_weight_and_homogeneous_batches(pools):
    assert allocate(10, [3, 1]) == [8, 2] and sum(allocate(7, [1, 1, 1])) == 7
    mixed = _stream(pools, batch=8, weights=(3.0, 1.0))
    greens = [int(g) for step in range(20) for g in mixed.batch(step)["items"][:, 1]]
    assert greens.count(100) == 20 * 6 and greens.count(200) == 20 * 2

    homogeneous = _stream(pools, batch=8, weights=(1.0, 1.0), homogeneous=0.5)
    single_source = [len(set(homogeneous.batch(s)["items"][:, 1].tolist())) == 1 for s in range(200)]
    assert 0.35 < np.mean(single_source) < 0.65
