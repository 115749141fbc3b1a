"""Data-loader images/s of the training input pipeline: dinoscale's `BatchStream` (seeded multi-crop
augmentation and iBOT masks, built by `build_stream`, what the trainer uses) over a webdataset tar-shard pool and
over an image-folder pool of the same images, at 0, 1 and 2 workers, against two pipelines that read
the same shards with plain webdataset (`WebDataset(...).decode("pil")`, `.batched`, a DataLoader):
DINOv2's torchvision multi-crop augmentation with the same crops (no masks), and a bare decode + one
RandomResizedCrop (what reading alone costs).

Synthetic 64-px images (about 80% JPEG, 20% PNG) are written to a temporary folder. In every round each
pipeline runs once per worker count, the order reversed every other round; a loader is timed over
`--batches` batches after its first `workers + 1` (worker start-up left out). images/s is the median
over the rounds, a ratio the median of the per-round ratios. With 0 workers all the work is in this
process, so images per CPU-second of the process are given too (steadier on a shared machine).

    python -m benchmarks.bench_data [--images 2000] [--batch 64] [--batches 20] [--rounds 3] [--workers 0 1 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torchvision.transforms as T
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from dinoscale.utils.machine import describe_machine
from dinoscale.config import load_config
from dinoscale.data.augment import IMAGENET_MEAN, IMAGENET_STD
from dinoscale.data.stream import make_loader
from dinoscale.data.synthetic import SyntheticSpec, make_synthetic_pool
from dinoscale.data.stream import build_stream

BASELINES = ("webdataset_multicrop", "webdataset_decode_crop")
SHARDS_PER_POOL = 8  # enough for every worker to read its own shards


def dinov2_multicrop(crops) -> Callable[[Image.Image], list[torch.Tensor]]:
    """DINOv2's `DataAugmentationDINO` written with torchvision transforms, with the crops of `crops`."""
    distort = [T.RandomHorizontalFlip(0.5 if crops.horizontal_flips else 0.0),
               T.RandomApply([T.ColorJitter(crops.color_jitter_brightness, crops.color_jitter_contrast,
                                            crops.color_jitter_saturation, crops.color_jitter_hue)],
                             p=crops.color_jitter_probability),
               T.RandomGrayscale(crops.grayscale_probability)]
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]

    def blur(p: float) -> T.RandomApply:
        return T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 2.0))], p=p)

    def crop(size: int, scale) -> T.RandomResizedCrop:
        return T.RandomResizedCrop(size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC)

    global_1 = T.Compose([crop(crops.global_crops_size, crops.global_crops_scale), *distort, blur(1.0), *normalize])
    global_2 = T.Compose([crop(crops.global_crops_size, crops.global_crops_scale), *distort, blur(0.1),
                          T.RandomSolarize(128, p=0.2), *normalize])
    local = T.Compose([crop(crops.local_crops_size, crops.local_crops_scale), *distort, blur(0.5), *normalize])
    return MultiCrop([global_1, global_2] + [local] * crops.local_crops_number)


class MultiCrop:
    """One output per transform (a picklable class: workers may be spawned)."""

    def __init__(self, transforms: list[Callable]):
        self.transforms = transforms

    def __call__(self, sample: tuple[Image.Image]) -> list[torch.Tensor]:
        return [transform(sample[0]) for transform in self.transforms]


def webdataset_loader(shards: list[str], make_sample: MultiCrop, batch: int, workers: int) -> DataLoader:
    dataset = (wds.WebDataset(shards, resampled=True, shardshuffle=False).decode("pil").to_tuple("jpg;png")
               .map(make_sample).batched(batch))
    return DataLoader(dataset, batch_size=None, num_workers=workers)


def time_loader(loader: DataLoader, batch: int, n_batches: int, workers: int) -> dict[str, float]:
    batches = iter(loader)
    for _ in range(workers + 1):
        next(batches)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n_batches):
        next(batches)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    del batches, loader
    gc.collect()  # shut the workers down before the next loader starts its own
    return {"images_per_s": batch * n_batches / wall, "images_per_cpu_s": batch * n_batches / cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="images in the synthetic pool")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per loader")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--global-size", type=int, default=32)
    parser.add_argument("--local-size", type=int, default=16)
    parser.add_argument("--local-crops", type=int, default=4)
    parser.add_argument("--patch-size", type=int, default=4, help="patch grid of the iBOT masks")
    args = parser.parse_args()

    def config(pool: Path):
        return load_config(None, [
            f"train.dataset_path={pool}", f"train.batch_size_per_gpu={args.batch}",
            f"student.patch_size={args.patch_size}", f"crops.global_crops_size={args.global_size}",
            f"crops.local_crops_size={args.local_size}", f"crops.local_crops_number={args.local_crops}"])

    with tempfile.TemporaryDirectory() as tmp:
        spec = SyntheticSpec(n_images=args.images, image_size=args.image_size, n_corrupt=0, eval_per_class=1)
        make_synthetic_pool(Path(tmp) / "shards", spec, fmt="shards", shard_size=-(-args.images // SHARDS_PER_POOL))
        make_synthetic_pool(Path(tmp) / "folder", spec)
        shards = sorted(str(p) for p in (Path(tmp) / "shards" / "pool").glob("*.tar"))
        cfg = {kind: config(Path(tmp) / kind / "pool") for kind in ("shards", "folder")}
        decode_crop = MultiCrop([T.Compose([T.RandomResizedCrop(args.global_size, scale=tuple(
            cfg["shards"].crops.global_crops_scale)), T.ToTensor()])])
        pipelines = {
            "dinoscale_shards": lambda w: make_loader(build_stream(cfg["shards"], 0, 1, 0), w),
            "dinoscale_folder": lambda w: make_loader(build_stream(cfg["folder"], 0, 1, 0), w),
            "webdataset_multicrop": lambda w: webdataset_loader(shards, dinov2_multicrop(cfg["shards"].crops),
                                                                args.batch, w),
            "webdataset_decode_crop": lambda w: webdataset_loader(shards, decode_crop, args.batch, w),
        }
        rounds: dict[int, list[dict[str, dict]]] = {w: [] for w in args.workers}
        for index in range(args.rounds):
            for workers in args.workers:
                names = list(pipelines) if index % 2 == 0 else list(pipelines)[::-1]
                rounds[workers].append({name: time_loader(pipelines[name](workers), args.batch, args.batches, workers)
                                        for name in names})

    results = {}
    for workers, runs in rounds.items():
        keys = ["images_per_s", "images_per_cpu_s"] if workers == 0 else ["images_per_s"]
        row: dict = {name: {k: statistics.median(r[name][k] for r in runs) for k in keys} for name in pipelines}
        for name in ("dinoscale_shards", "dinoscale_folder"):
            for baseline in BASELINES:
                for k in keys:
                    prefix = "ratio" if k == "images_per_s" else "cpu_ratio"
                    row[f"{prefix}_{name}_vs_{baseline}"] = statistics.median(r[name][k] / r[baseline][k] for r in runs)
        results[str(workers)] = row
    print(json.dumps({
        "benchmark": "data_loader",
        "machine": describe_machine(webdataset=wds.__version__),
        "setup": {"images": args.images, "image_size": args.image_size, "batch": args.batch,
                  "timed_batches": args.batches, "rounds": args.rounds, "shards": len(shards),
                  "crops": f"2x{args.global_size} + {args.local_crops}x{args.local_size}",
                  "ibot_mask_grid": args.global_size // args.patch_size},
        "workers": results,
    }, indent=2))


if __name__ == "__main__":
    main()
