"""Curation algorithms at growing pool sizes: dedup and hierarchical k-means wall time, their
growth exponents, and hierarchical k-means against a plain-PyTorch implementation of Vo et al.'s
algorithm (greedy k-means++ seeding of every fit on all its points, Lloyd iterations with
torch.cdist/argmin, the same levels and resampling steps) on identical data, with the balance each
achieves. Times are wall clock and CPU seconds of the process (on a machine shared with other jobs
the second is the steadier measure of the work); dinoscale's k-means runs before and after the
baseline and the ratio uses the mean. dinoscale's implementation differs in how, not what: faiss searches, Hamerly's bounds
where they pay, early exit at a fixed point, k-means++ steps with exact distances only where a bf16
screen cannot rule a point out, greedy k-means++ on at most `seeding_points_per_cluster` points per
cluster (which only affects the first fit of a level), and by default (`lloyd_precision`) bf16
GEMMs for the searches inside Lloyd iterations, which may break near ties differently (every
level's final assignment is float32, as the baseline's).

Data, 256-d and L2-normalised: for dedup, unrelated points of which 5% are near-duplicate copies
(cosine > 0.99) of others; for k-means, points around N/1000 centres (as many as top-level
clusters) whose sizes follow a Zipf law (a few huge modes, a long tail; cosine about 0.5 within a
centre, 0 across). Balance: normalised entropy of the planted-centre histogram of a hierarchical
sample of N/10 points (1 = every centre equally represented), against a uniform random sample.

    python -m benchmarks.bench_curation [--max-n 1000000] [--baseline-max-n 100000] [--threads 1]

On a machine shared with other jobs, run it with OMP_WAIT_POLICY=passive: faiss and torch
spin-wait in OpenMP by default, which made every step several times slower there.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from dinoscale.utils.machine import describe_machine, peak_rss_mib
from dinoscale.curation.config import DedupConfig, KMeansConfig, SamplingConfig
from dinoscale.curation.dedup import deduplicate
from dinoscale.curation.kmeans import ClusterLevel, ClusterTree, fit_hierarchical_kmeans
from dinoscale.curation.sampling import hierarchical_sample

DIM = 256


def clustered_pool(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, 256) L2-normalised float32 points around N/1000 Zipf-sized centres, and each one's centre."""
    rng = np.random.default_rng(seed)
    n_centres = max(n // 1000, 10)
    weights = 1.0 / np.arange(1, n_centres + 1) ** 1.1
    labels = rng.choice(n_centres, size=n, p=weights / weights.sum())
    centres = rng.standard_normal((n_centres, DIM)).astype(np.float32)
    x = centres[labels] + rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


def pool_with_duplicates(n: int, seed: int = 1) -> np.ndarray:
    """(N, 256) unrelated L2-normalised points, 5% of them near-duplicate copies of others."""
    rng = np.random.default_rng(seed)
    n_dup = n // 20
    x = rng.standard_normal((n - n_dup, DIM)).astype(np.float32)
    copies = rng.choice(n - n_dup, size=n_dup, replace=False)
    x = np.concatenate([x, x[copies] + 0.05 * rng.standard_normal((n_dup, DIM)).astype(np.float32)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def kmeans_config(n: int) -> KMeansConfig:
    return KMeansConfig(n_clusters=[max(n // 100, 10), max(n // 1000, 2)], n_resampling_steps=[3, 3],
                        sample_size=[20, 3], n_iter=10, init="kmeans++")


# ----------------------------------------------------------------------------- plain-PyTorch baseline
@dataclass
class TorchHierarchicalKMeans:
    """Vo et al.'s hierarchical k-means with resampling written with plain PyTorch tensor ops."""

    cfg: KMeansConfig
    seed: int = 0
    chunk: int = 16384

    def fit(self, x: np.ndarray) -> ClusterTree:
        gen = torch.Generator().manual_seed(self.seed)
        items = torch.from_numpy(x)
        levels = []
        for i, k in enumerate(self.cfg.n_clusters):
            k = min(k, items.shape[0])
            centroids = self.kmeans(items, k, gen)
            assignment, distances = self.assign(items, centroids)
            steps = self.cfg.n_resampling_steps[i] if self.cfg.sample_size[i] > 1 else 0
            for _ in range(steps):
                picked = self.closest_per_cluster(assignment, distances, self.cfg.sample_size[i])
                centroids = self.kmeans(items[picked], k, gen)
                assignment, distances = self.assign(items, centroids)
            used, assignment = torch.unique(assignment, return_inverse=True)
            centroids = centroids[used]
            levels.append(ClusterLevel(centroids.numpy(), assignment.numpy(), distances.numpy()))
            items = centroids
        return ClusterTree(levels)

    def assign(self, x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, dists = [], []
        for lo in range(0, x.shape[0], self.chunk):
            d = torch.cdist(x[lo:lo + self.chunk], centroids)
            best = d.min(1)
            ids.append(best.indices)
            dists.append(best.values ** 2)
        return torch.cat(ids), torch.cat(dists)

    def kmeans(self, x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
        k = min(k, x.shape[0])
        centroids = self.kmeans_plus_plus(x, k, gen)
        for _ in range(self.cfg.n_iter):
            assignment, _ = self.assign(x, centroids)
            sums = torch.zeros_like(centroids).index_add_(0, assignment, x)
            counts = torch.bincount(assignment, minlength=k).unsqueeze(1)
            centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        return centroids

    @staticmethod
    def kmeans_plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
        """Greedy k-means++: the best of 2 + ln(k) D^2-sampled candidates for each next centroid."""
        n_candidates = 2 + int(np.log(k))
        sq = (x * x).sum(1)
        chosen = [int(torch.randint(x.shape[0], (1,), generator=gen))]
        closest = (sq - 2 * x @ x[chosen[0]] + sq[chosen[0]]).clamp_(min=0)
        for _ in range(1, k):
            candidates = torch.multinomial(closest + 1e-12, n_candidates, replacement=True, generator=gen)
            d = (sq[:, None] - 2 * x @ x[candidates].T + sq[candidates][None]).clamp_(min=0)
            d = torch.minimum(d, closest[:, None])
            best = int(d.sum(0).argmin())
            closest = d[:, best].contiguous()
            chosen.append(int(candidates[best]))
        return x[chosen].clone()

    @staticmethod
    def closest_per_cluster(assignment: torch.Tensor, distances: torch.Tensor, size: int) -> torch.Tensor:
        order = np.lexsort((distances.numpy(), assignment.numpy()))
        groups = assignment.numpy()[order]
        starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
        rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
        return torch.from_numpy(np.sort(order[rank < size]))


# ----------------------------------------------------------------------------- measurements
def normalised_entropy(labels: np.ndarray, n_labels: int) -> float:
    counts = np.bincount(labels, minlength=n_labels)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / np.log(n_labels))


@dataclass
class Timing:
    wall_s: float
    cpu_s: float  # of every thread of this process: what the work cost, whatever else the machine ran


def timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, Timing(time.perf_counter() - wall, time.process_time() - cpu)


def balance(tree: ClusterTree, labels: np.ndarray, n_labels: int) -> float:
    sample = hierarchical_sample(tree, SamplingConfig(target_size=len(labels) // 10), seed=0)
    return normalised_entropy(labels[sample.indices], n_labels)


def growth_exponent(sizes: list[int], seconds: list[float]) -> float | None:
    if len(sizes) < 2:
        return None
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-n", type=int, default=100_000, help="largest pool (powers of 10 from 1e4)")
    parser.add_argument("--baseline-max-n", type=int, default=100_000, help="largest pool for the PyTorch baseline")
    parser.add_argument("--threads", type=int, default=None, help="threads for faiss and torch (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)

    sizes = [n for n in (10_000, 100_000, 1_000_000, 10_000_000) if n <= args.max_n]
    rows = []
    for n in sizes:
        dedup, dedup_time = timed(deduplicate, pool_with_duplicates(n), DedupConfig())
        x, labels = clustered_pool(n)
        n_labels = int(labels.max()) + 1
        cfg = kmeans_config(n)
        tree, kmeans_time = timed(fit_hierarchical_kmeans, x, cfg, seed=0)
        row = {
            "n": n,
            "dedup_s": round(dedup_time.wall_s, 2),
            "dedup_cpu_s": round(dedup_time.cpu_s, 2),
            "dedup_index": "ivf" if n >= DedupConfig().ivf_min_size else "flat",
            "dedup_removed": n - dedup.counts["kept"],
            "kmeans_config": {name: getattr(cfg, name) for name in (
                "n_clusters", "n_resampling_steps", "sample_size", "n_iter", "init", "seeding_points_per_cluster",
                "lloyd_precision")},
            "kmeans_s": round(kmeans_time.wall_s, 2),
            "kmeans_cpu_s": round(kmeans_time.cpu_s, 2),
            "kmeans_balance": round(balance(tree, labels, n_labels), 4),
            "random_sample_balance": round(normalised_entropy(
                labels[np.random.default_rng(0).choice(n, n // 10, replace=False)], n_labels), 4),
        }
        if n <= args.baseline_max_n:
            baseline_tree, baseline_time = timed(TorchHierarchicalKMeans(cfg).fit, x)
            # dinoscale again right after the baseline: a load that changed meanwhile weighs on both
            _, again = timed(fit_hierarchical_kmeans, x, cfg, seed=0)
            wall = (kmeans_time.wall_s + again.wall_s) / 2
            cpu = (kmeans_time.cpu_s + again.cpu_s) / 2
            row |= {
                "kmeans_s_before_after_baseline": [round(kmeans_time.wall_s, 2), round(again.wall_s, 2)],
                "torch_baseline_s": round(baseline_time.wall_s, 2),
                "torch_baseline_cpu_s": round(baseline_time.cpu_s, 2),
                "speedup_vs_torch": round(baseline_time.wall_s / wall, 2),
                "cpu_speedup_vs_torch": round(baseline_time.cpu_s / cpu, 2),
                "torch_baseline_balance": round(balance(baseline_tree, labels, n_labels), 4),
            }
        rows.append(row)
        print(json.dumps(row), flush=True)

    report = {
        "benchmark": "curation",
        "machine": describe_machine(faiss_gpus=faiss.get_num_gpus()),
        "dim": DIM,
        "results": rows,
        "dedup_growth_exponent": growth_exponent(sizes, [r["dedup_s"] for r in rows]),
        "dedup_cpu_growth_exponent": growth_exponent(sizes, [r["dedup_cpu_s"] for r in rows]),
        "kmeans_growth_exponent": growth_exponent(sizes, [r["kmeans_s"] for r in rows]),
        "kmeans_cpu_growth_exponent": growth_exponent(sizes, [r["kmeans_cpu_s"] for r in rows]),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
