"""Shared by the evaluation tests: `workspace`, class folders of tiny coloured PNGs (train, val and
a val subset of two classes) with a tiny saved backbone."""

import numpy as np
import pytest
from PIL import Image

from dinoscale.models.loading import save_backbone

COLOURS = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}


def write_split(root, n_per_class: int, rng, classes=COLOURS) -> None:
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            pixels = np.array(COLOURS[name]) + rng.normal(0, 25, (20, 20, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("eval_cli")
    rng = np.random.default_rng(0)
    write_split(root / "train", 8, rng)
    write_split(root / "val", 4, rng)
    write_split(root / "val_subset", 3, rng, classes=["blue", "red"])
    save_backbone(tiny_backbone(), root / "backbone.pth")
    return root
