"""Evaluation throughput and memory: chunked k-NN against one dense similarity matrix, feature
extraction in fp32 and bf16 autocast, feature extraction from image files against the per-image
torchvision transform in one process, and the batched linear-probe grid against one run per point.

    .venv/bin/python -m benchmarks.bench_eval [--bank 100000] [--queries 2000] [--images 32] [--threads N]
        [--files 800]

Each k-NN variant runs in its own process so its peak resident memory is its own.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as TF

from dinoscale.config import load_config
from dinoscale.data.pool import open_pool
from dinoscale.eval.features import RESIZE_RATIO, ArrayImages, eval_crop, eval_transform, extract_features
from dinoscale.eval.knn import knn_search
from dinoscale.eval.linear import train_linear_classifiers
from dinoscale.models.presets import build_backbone
from dinoscale.utils.device import inference_autocast, torch_threads
from dinoscale.utils.machine import describe_machine, peak_rss_mib

ICONS = Path("/usr/share/icons/oxygen/base/64x64")
WORKERS = (0, 2)
KNN_VARIANTS = {"chunked_default": (256, 65536), "chunked_small": (64, 8192), "dense": None}


def knn_child(variant: str, n_bank: int, n_queries: int, dim: int, k: int) -> dict:
    """One k-NN variant on seeded random unit features; reports time, peak memory and a checksum."""
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(n_bank, dim, generator=g), torch.randn(n_queries, dim, generator=g)
    bank /= bank.norm(dim=1, keepdim=True)  # in place: the set-up must not leave a larger peak than the search
    queries /= queries.norm(dim=1, keepdim=True)
    base_rss = peak_rss_mib()
    start = time.perf_counter()
    if KNN_VARIANTS[variant] is None:
        sims = (queries @ bank.T).topk(k, dim=1).values
    else:
        query_chunk, bank_chunk = KNN_VARIANTS[variant]
        sims = torch.cat([knn_search(queries[i:i + query_chunk], bank, k, bank_chunk)[0]
                          for i in range(0, n_queries, query_chunk)])
    seconds = time.perf_counter() - start
    return {"variant": variant, "seconds": seconds, "queries_per_s": n_queries / seconds,
            "peak_rss_mib": peak_rss_mib(), "rss_before_search_mib": base_rss,
            "similarity_checksum": float(sims.double().sum())}


def bench_knn(n_bank: int, n_queries: int, dim: int, k: int) -> dict:
    results = {}
    for variant in KNN_VARIANTS:
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_eval", "--knn-child", variant,
                              "--bank", str(n_bank), "--queries", str(n_queries), "--dim", str(dim), "--k", str(k),
                              "--threads", str(torch.get_num_threads())],
                             check=True, capture_output=True, text=True)
        results[variant] = json.loads(out.stdout)
    dense = results["dense"]
    for variant, r in results.items():
        r["speed_vs_dense"] = r["queries_per_s"] / dense["queries_per_s"]
        r["search_memory_vs_dense"] = ((r["peak_rss_mib"] - r["rss_before_search_mib"])
                                       / max(dense["peak_rss_mib"] - dense["rss_before_search_mib"], 1e-9))
        r["same_neighbour_similarities_as_dense"] = abs(r["similarity_checksum"] - dense["similarity_checksum"]) < 1e-2
    return {"bank": n_bank, "queries": n_queries, "dim": dim, "k": k, "variants": results}


def bench_features(n_images: int, image_size: int) -> dict:
    torch.manual_seed(0)
    model = build_backbone({"arch": "vit_small", "patch_size": 16, "img_size": image_size})
    images = ArrayImages(np.random.default_rng(0).integers(0, 256, (n_images, image_size, image_size, 3),
                                                            dtype=np.uint8))
    results = {}
    for precision in ("fp32", "bf16"):
        extract_features(model, ArrayImages(images.images[:4]), image_size, batch_size=4, precision=precision,
                         device=torch.device("cpu"))  # warm-up
        start = time.perf_counter()
        extract_features(model, images, image_size, batch_size=16, precision=precision, device=torch.device("cpu"))
        results[precision] = {"images_per_s": n_images / (time.perf_counter() - start)}
    results["bf16_speedup"] = results["bf16"]["images_per_s"] / results["fp32"]["images_per_s"]
    return {"model": "vit_small/16", "image_size": image_size, "images": n_images, **results}


class _PerImageTransform(Dataset):
    """The baseline: torchvision's eval transform applied to each image, float tensors collated."""

    def __init__(self, pool, image_size: int):
        self.pool, self.transform = pool, eval_transform(image_size)

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.pool.load(index))


@torch.no_grad()
def _per_image_features(model, pool, image_size: int, batch_size: int) -> torch.Tensor:
    cls = []
    for batch in DataLoader(_PerImageTransform(pool, image_size), batch_size=batch_size):
        with inference_autocast(torch.device("cpu"), "auto"):
            cls.append(model.forward_features(batch)["x_norm_clstoken"].float())
    return torch.cat(cls)


def _icon_pool(n_files: int, folder: Path):
    """The first `n_files` Oxygen icons of 64 px (real PNGs, decoded from disk), as a path list."""
    paths = sorted(ICONS.rglob("*.png"))[:n_files]
    (folder / "icons.txt").write_text("\n".join(str(p) for p in paths) + "\n")
    return open_pool(folder / "icons.txt")


def bench_files(n_files: int, rounds: int) -> dict:
    """Features of 64-px icon files at 32 px by the train/small_pool ViT, the way `dinoscale eval` reads
    them (workers decode and resize, normalisation once per batch), against the per-image torchvision
    transform in one process; rounds interleaved, medians kept."""
    if not ICONS.is_dir():
        return {"skipped": f"{ICONS} is absent (apt package oxygen-icon-theme)"}
    torch.manual_seed(0)
    model = build_backbone(load_config("train/small_pool").student).eval()
    image_size, batch_size = 32, 256
    with tempfile.TemporaryDirectory() as tmp:
        pool = _icon_pool(n_files, Path(tmp))
        runs = {"per_image_transform": lambda: _per_image_features(model, pool, image_size, batch_size)}
        for workers in WORKERS:
            runs[f"dinoscale_{workers}_workers"] = functools.partial(
                lambda w: extract_features(model, pool, image_size, batch_size, num_workers=w,
                                           device=torch.device("cpu")).cls, workers)
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        cpu_seconds: dict[str, list[float]] = {name: [] for name in runs}  # this process only, not its workers
        features = {name: run() for name, run in runs.items()}  # warm-up round, not timed
        for _ in range(rounds):
            for name, run in runs.items():
                start, cpu_start = time.perf_counter(), time.process_time()
                features[name] = run()
                seconds[name].append(time.perf_counter() - start)
                cpu_seconds[name].append(time.process_time() - cpu_start)
    baseline, baseline_cpu = (statistics.median(t["per_image_transform"]) for t in (seconds, cpu_seconds))
    results = {name: {"images_per_s": len(pool) / statistics.median(s), "seconds": s, "cpu_seconds": cpu_seconds[name]}
               for name, s in seconds.items()}
    for workers in WORKERS:
        name = f"dinoscale_{workers}_workers"
        results[name]["speedup_vs_per_image_transform"] = baseline / statistics.median(seconds[name])
        results[name]["max_abs_feature_difference"] = float((features[name] - features["per_image_transform"])
                                                            .abs().max())
    results["dinoscale_0_workers"]["cpu_speedup_vs_per_image_transform"] = (
        baseline_cpu / statistics.median(cpu_seconds["dinoscale_0_workers"]))
    return {"images": len(pool), "source": "oxygen-icon-theme 64x64 PNGs", "image_size": image_size,
            "model": "train/small_pool ViT (48 wide, 3 blocks, patch 8)", "batch_size": batch_size, **results,
            "resize": bench_resize()}


RESIZE_CASES = {"64px_to_32px": (64, 64, 32, 512), "375x500px_to_224px": (375, 500, 224, 32)}


def bench_resize(rounds: int = 5) -> dict:
    """CPU time per image of the eval resize (bicubic to 256/224 of the crop, centre crop): PIL one
    image at a time, as the data-loader workers run it, against torch resizing a whole batch of
    same-size images at once (antialiased bicubic), in one thread."""
    results = {}
    with torch_threads(1):
        for name, (height, width, crop, n) in RESIZE_CASES.items():
            arrays = np.random.default_rng(0).integers(0, 256, (n, height, width, 3), dtype=np.uint8)
            images = [Image.fromarray(a) for a in arrays]
            batch = torch.from_numpy(arrays).permute(0, 3, 1, 2).float()
            per_image = eval_crop(crop)
            pil = _best_cpu_seconds(lambda: [np.array(per_image(image)) for image in images], rounds) / n
            batched = _best_cpu_seconds(lambda: TF.center_crop(TF.resize(
                batch, [round(crop * RESIZE_RATIO)], interpolation=TF.InterpolationMode.BICUBIC, antialias=True),
                [crop]), rounds) / n
            results[name] = {"pil_per_image_us": 1e6 * pil, "torch_batched_us": 1e6 * batched,
                             "batched_speedup": pil / batched}
    return results


def _best_cpu_seconds(run, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return best


def bench_linear(n: int, dim: int, n_classes: int, grid: int, epochs: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, dim, generator=g), torch.randint(0, n_classes, (n,), generator=g)
    lrs, wds = torch.logspace(-4, -1, grid), torch.zeros(grid)
    start = time.perf_counter()
    train_linear_classifiers(x, y, n_classes, lrs, wds, epochs, batch_size=256)
    batched = time.perf_counter() - start
    start = time.perf_counter()
    for point in range(grid):
        train_linear_classifiers(x, y, n_classes, lrs[point:point + 1], wds[point:point + 1], epochs, batch_size=256)
    sequential = time.perf_counter() - start
    return {"features": n, "dim": dim, "classes": n_classes, "grid_points": grid, "epochs": epochs,
            "batched_seconds": batched, "one_run_per_point_seconds": sequential,
            "batched_speedup": sequential / batched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--files", type=int, default=800, help="icon files of the file-reading benchmark")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the file-reading benchmark")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--parts", nargs="+", choices=["knn", "features", "files", "linear"],
                        default=["knn", "features", "files", "linear"])
    parser.add_argument("--knn-child", choices=list(KNN_VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.knn_child:
        print(json.dumps(knn_child(args.knn_child, args.bank, args.queries, args.dim, args.k)))
        return
    parts = {"knn": lambda: bench_knn(args.bank, args.queries, args.dim, args.k),
             "features": lambda: bench_features(args.images, args.image_size),
             "files": lambda: bench_files(args.files, args.rounds),
             "linear": lambda: bench_linear(n=20_000, dim=768, n_classes=100, grid=12, epochs=2)}
    print(json.dumps({"machine": describe_machine(), **{name: parts[name]() for name in args.parts}}, indent=2))


if __name__ == "__main__":
    main()
