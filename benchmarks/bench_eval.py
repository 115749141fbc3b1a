"""Evaluation throughput and memory: chunked k-NN against one dense similarity matrix, feature
extraction in fp32 and bf16 autocast, and the batched linear-probe grid against one run per point.

    .venv/bin/python -m benchmarks.bench_eval [--bank 100000] [--queries 2000] [--images 32] [--threads N]

Each k-NN variant runs in its own process so its peak resident memory is its own.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch

from dinoscale.utils.machine import describe_machine, peak_rss_mib
from dinoscale.eval.features import ArrayImages, extract_features
from dinoscale.eval.knn import knn_search
from dinoscale.eval.linear import train_linear_classifiers
from dinoscale.models.presets import build_backbone

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
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--parts", nargs="+", choices=["knn", "features", "linear"],
                        default=["knn", "features", "linear"])
    parser.add_argument("--knn-child", choices=list(KNN_VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.knn_child:
        print(json.dumps(knn_child(args.knn_child, args.bank, args.queries, args.dim, args.k)))
        return
    parts = {"knn": lambda: bench_knn(args.bank, args.queries, args.dim, args.k),
             "features": lambda: bench_features(args.images, args.image_size),
             "linear": lambda: bench_linear(n=20_000, dim=768, n_classes=100, grid=12, epochs=2)}
    print(json.dumps({"machine": describe_machine(), **{name: parts[name]() for name in args.parts}}, indent=2))


if __name__ == "__main__":
    main()
