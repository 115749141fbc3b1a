"""Embedding throughput of the curation embed stage: images/s through `embed_slice` (decode, resize,
forward, normalise) for a ViT-S/16 at 224 px in fp32 and bf16 autocast, a tiny ViT at 32 px (the
size the demo trains) and the `pixels` copy-detection embedder. Prints one JSON object.

    .venv/bin/python -m benchmarks.bench_embed [--images 64] [--batch-size 32] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinoscale.utils.machine import describe_machine, peak_rss_mib
from dinoscale.config import load_config
from dinoscale.curation import embed
from dinoscale.data.pool import open_pool
from dinoscale.models import build_backbone, save_backbone

VIT_S16 = dict(arch="vit_small", patch_size=16, img_size=224)
TINY = dict(arch="vit_small", embed_dim=64, depth=4, num_heads=4, patch_size=4, img_size=32)


def make_pool(directory: Path, n_images: int, side: int) -> None:
    """Smooth random JPEGs of `side` px (decoding cost like a photo of that size)."""
    rng = np.random.default_rng(0)
    for i in range(n_images):
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(low).resize((side, side), Image.BICUBIC).save(directory / f"{i:05d}.jpg", quality=90)


def run(pool_dir: Path, backbone: str, image_size: int, precision: str, batch_size: int) -> dict:
    cfg = load_config(None, [f"curation.embed.backbone={backbone}", f"curation.embed.image_size={image_size}",
                             f"curation.embed.precision={precision}"]).curation.embed
    embedders = embed.pool_embedders(cfg)
    pool = open_pool(pool_dir)
    embed.embed_slice(pool, range(min(batch_size, len(pool))), embedders, "", batch_size, 0)  # warm-up
    start = time.perf_counter()
    result = embed.embed_slice(pool, range(len(pool)), embedders, "", batch_size, 0)
    seconds = time.perf_counter() - start
    return {"images": len(pool), "seconds": seconds, "images_per_s": len(pool) / seconds,
            "dim": int(result.arrays[embed.MAIN].shape[1]), "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {"machine": describe_machine()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        for name, side in (("pool_256", 256), ("pool_36", 36)):
            (tmp_path / name).mkdir()
            make_pool(tmp_path / name, args.images, side)
        torch.manual_seed(0)
        for name, spec in (("vit_s16", VIT_S16), ("tiny", TINY)):
            save_backbone(build_backbone(spec), tmp_path / f"{name}.pth")
        runs = {
            "vit_s16_224_fp32": (tmp_path / "pool_256", str(tmp_path / "vit_s16.pth"), 224, "fp32"),
            "vit_s16_224_bf16": (tmp_path / "pool_256", str(tmp_path / "vit_s16.pth"), 224, "bf16"),
            "tiny_32_fp32": (tmp_path / "pool_36", str(tmp_path / "tiny.pth"), 32, "fp32"),
            "tiny_32_bf16": (tmp_path / "pool_36", str(tmp_path / "tiny.pth"), 32, "bf16"),
            "pixels_8": (tmp_path / "pool_36", embed.PIXELS, 8, "fp32"),
        }
        for label, (pool_dir, backbone, size, precision) in runs.items():
            results[label] = run(pool_dir, backbone, size, precision, args.batch_size)
    results["bf16_speedup_vit_s16"] = (results["vit_s16_224_bf16"]["images_per_s"]
                                       / results["vit_s16_224_fp32"]["images_per_s"])
    results["bf16_speedup_tiny"] = results["tiny_32_bf16"]["images_per_s"] / results["tiny_32_fp32"]["images_per_s"]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
