"""Feature extraction: the standard eval transform, pool order, skipped images, precision, ranks."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinoscale.data.pool import open_pool
from dinoscale.errors import ConfigError
from dinoscale.eval.features import ArrayImages, extract_features
from dinoscale.utils.device import autocast_dtype

def reference_input(image: np.ndarray, crop: int) -> torch.Tensor:
    """The DINO eval transform of a square uint8 image, written out: bicubic resize to crop * 256/224,
    centre crop, ImageNet mean/std."""
    resized = round(crop * 256 / 224)
    pil = Image.fromarray(image).resize((resized, resized), Image.BICUBIC)
    offset = round((resized - crop) / 2)
    array = np.asarray(pil, dtype=np.float32)[offset:offset + crop, offset:offset + crop] / 255.0
    array = (array - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1)


def test_features_equal_a_direct_forward_in_pool_order(tiny_backbone):
    images = np.random.default_rng(0).integers(0, 256, (7, 24, 24, 3), dtype=np.uint8)
    labels = [2, 0, 1, 1, 0, 2, 2]
    model = tiny_backbone()
    features = extract_features(model, ArrayImages(images, labels), image_size=16, batch_size=3, precision="fp32",
                                device=torch.device("cpu"))
    with torch.no_grad():
        out = model.forward_features(torch.stack([reference_input(im, 16) for im in images]))
    torch.testing.assert_close(features.cls, out["x_norm_clstoken"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(features.patch_mean, out["x_norm_patchtokens"].mean(1), atol=1e-4, rtol=1e-4)
    assert features.labels.tolist() == labels
    both = features.select("cls_patchmean")
    assert both.shape == (7, 64) and torch.equal(both[:, 32:], features.patch_mean)
    with pytest.raises(ConfigError):
        features.select("avgpool")


def test_bf16_features_stay_close_to_fp32(tiny_backbone):
    images = ArrayImages(np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    model = tiny_backbone()
    fp32 = extract_features(model, images, image_size=16, precision="fp32", device=torch.device("cpu"))
    bf16 = extract_features(model, images, image_size=16, precision="bf16", device=torch.device("cpu"))
    assert fp32.labels is None
    assert fp32.cls.dtype == bf16.cls.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(fp32.cls, bf16.cls)
    assert cos.min() > 0.99


def test_autocast_dtype_follows_the_hardware_and_never_fp16():
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split())
    expected = torch.bfloat16 if {"avx512_bf16", "amx_bf16"} & flags else None
    assert autocast_dtype(torch.device("cpu"), "auto") == expected
    assert autocast_dtype(torch.device("cpu"), "fp32") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    with pytest.raises(ConfigError):
        autocast_dtype(torch.device("cpu"), "fp16")


def write_folder(root: Path, n_per_class: int = 3, corrupt: bool = True) -> None:
    rng = np.random.default_rng(0)
    for c, name in enumerate(["ant", "bee"]):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    if corrupt:
        (root / "ant" / "1b_broken.png").write_bytes(b"not a png")


def test_unreadable_images_are_left_out_and_labels_stay_aligned(tmp_path, tiny_backbone):
    write_folder(tmp_path)
    pool = open_pool(tmp_path)
    features = extract_features(tiny_backbone(), pool, image_size=16, batch_size=2, precision="fp32",
                                device=torch.device("cpu"))
    assert len(pool) == 7 and len(features) == 6
    assert "ant/1b_broken" not in features.keys
    assert features.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert features.class_names == ["ant", "bee"]


def test_image_size_must_be_a_multiple_of_the_patch_size(tiny_backbone):
    images = ArrayImages(np.zeros((2, 16, 16, 3), dtype=np.uint8))
    with pytest.raises(ConfigError, match="multiple of the backbone's patch size"):
        extract_features(tiny_backbone(), images, image_size=18, device=torch.device("cpu"))


WORKER = """
import sys, torch, torch.distributed as dist
from dinoscale.data.pool import open_pool
import dinoscale.eval.features as features_module
from dinoscale.eval.features import extract_features
from dinoscale.models.presets import build_backbone
features_module.GATHER_BLOCK_ROWS = 2  # several gather rounds, the last one partly padding
dist.init_process_group("gloo")
torch.manual_seed(0)
model = build_backbone({tiny!r})
features = extract_features(model, open_pool(sys.argv[1]), image_size=16, batch_size=2, precision="fp32",
                            device=torch.device("cpu"))
torch.save({{"cls": features.cls, "keys": features.keys, "labels": features.labels}},
           f"{{sys.argv[2]}}/rank{{dist.get_rank()}}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_gather_the_same_features_as_one_process(tmp_path, tiny_student, tiny_backbone):
    images = tmp_path / "images"
    write_folder(images, n_per_class=4)  # 9 items, one unreadable: the ranks hold 3 and 5 readable rows
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER.format(tiny=tiny_student)))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(images),
                    str(tmp_path)], check=True, env=env, timeout=240, capture_output=True)
    single = extract_features(tiny_backbone(), open_pool(images), image_size=16, batch_size=2, precision="fp32",
                              device=torch.device("cpu"))
    for r in range(2):
        gathered = torch.load(tmp_path / f"rank{r}.pt")
        assert gathered["keys"] == single.keys
        assert torch.equal(gathered["labels"], single.labels)
        torch.testing.assert_close(gathered["cls"], single.cls, atol=1e-5, rtol=1e-5)
