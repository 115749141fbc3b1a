"""What the distributed curation tests run on every rank: `python tests/curation_ranks.py SCENARIO OUT
[ARGS]`, alone (a world of one) or under `python -m torch.distributed.run --nproc_per_node=N`.

  algorithms OUT    dedup (flat and inverted-file index, exact hashes, a reference set; a random
                    walk whose look-alike chains the survivor rule must not merge), 3-level
                    k-means (bf16 searches, screened seeding, random resampling) and sampling on
                    small data cut into blocks of 1024 rows; rank 0 writes OUT (.npz)
  rings OUT SEED..  Vo et al.'s five-ring toy: the 2-level tree of their README and 10 samples of
                    1000 points per seed; rank 0 writes the normalised ring entropies to OUT (.json)
  disagree OUT      every rank fits k-means on different data (one row fewer per rank)
  cli OUT ARGS..    `dinoscale ARGS` (OUT unused), optionally after `--kill-rank R --at-level L`
                    (rank R SIGKILLs itself when k-means level L starts) or `--fail-rank R` (rank R
                    raises in its first Lloyd iteration)
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import dinoscale.curation.collective as collective  # noqa: E402
from dinoscale.curation.config import DedupConfig, KMeansConfig, SamplingConfig  # noqa: E402
from dinoscale.errors import DataError  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))


def blobs(n: int, dim: int, n_blobs: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_blobs, dim)) * 2
    x = centres[rng.integers(0, n_blobs, n)] + rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def algorithms(out: str) -> None:
    from dinoscale.curation.dedup import deduplicate
    from dinoscale.curation.kmeans import fit_hierarchical_kmeans
    from dinoscale.curation.sampling import hierarchical_sample

    collective.BLOCK_ROWS = 1024
    x = blobs(6000, 96, 40, seed=0)
    rng = np.random.default_rng(1)
    copies = rng.choice(6000, size=(150, 2), replace=False)
    x[copies[:, 1]] = x[copies[:, 0]]  # identical embeddings: near duplicates, and half also exact ones
    hashes = [f"{i:064x}" for i in range(6000)]
    for a, b in copies[:75]:
        hashes[b] = hashes[a]
    reference = x[rng.choice(6000, size=3, replace=False)].astype(np.float32)
    results = {}
    for name, ivf_min_size in (("flat", 10 ** 9), ("ivf", 1000)):
        cfg = DedupConfig(k=8, threshold=0.9, ivf_min_size=ivf_min_size, nprobe=4, decontamination_threshold=0.95)
        found = deduplicate(x, cfg, hashes=hashes, pixel_counts=np.random.default_rng(5).integers(1, 4, 6000),
                            reference_sets=[reference], seed=2)
        results[f"{name}_keep"], results[f"{name}_contaminated"] = found.keep, found.contaminated
        results[f"{name}_groups"] = np.concatenate([np.r_[len(g), g] for g in found.groups])
    walk_rng = np.random.default_rng(6)  # a random walk: chains of look-alikes that must not merge
    walk = np.cumsum(0.25 * walk_rng.standard_normal((3000, 32)), axis=0)
    results["walk"] = (walk / np.linalg.norm(walk, axis=1, keepdims=True)).astype(np.float32)
    found = deduplicate(results["walk"], DedupConfig(k=8, threshold=0.9), pixel_counts=walk_rng.integers(1, 4, 3000),
                        keys=[f"{j:05d}" for j in walk_rng.permutation(3000)])
    results["walk_keep"], results["walk_members"] = found.keep, np.concatenate(found.groups)
    results["walk_group_starts"] = np.cumsum([0] + [len(g) for g in found.groups[:-1]])
    cfg = KMeansConfig(n_clusters=[60, 12, 4], n_resampling_steps=[2, 2, 1], sample_size=[8, 3, 2], n_iter=8,
                       resampling_strategy="random", train_sample=4000, seeding_points_per_cluster=20)
    survivors = np.flatnonzero(results["flat_keep"])
    tree = fit_hierarchical_kmeans(x[survivors], cfg, seed=3)
    sample = hierarchical_sample(tree, SamplingConfig(target_size=800), seed=4)
    for i, level in enumerate(tree.levels):
        results[f"assignment_{i}"], results[f"centroids_{i}"] = level.assignment, level.centroids
    results["sample"], results["sample_paths"] = sample.indices, sample.cluster_path
    if RANK == 0:
        np.savez(out, **results)


def rings(out: str, seeds: list[int]) -> None:
    from curation.test_kmeans import ring_sample_counts

    counts = [ring_sample_counts(seed).tolist() for seed in seeds]
    if RANK == 0:
        Path(out).write_text(json.dumps(counts))


def disagree() -> None:
    from dinoscale.curation.kmeans import fit_hierarchical_kmeans

    x = blobs(500 - RANK, 16, 5, seed=0)
    fit_hierarchical_kmeans(x, KMeansConfig(n_clusters=[5], n_resampling_steps=[0], sample_size=[1]))


def cli(argv: list[str]) -> int:
    import dinoscale.curation.kmeans as kmeans
    from dinoscale.cli import main

    if argv[:1] == ["--kill-rank"]:
        victim, level, argv = int(argv[1]), int(argv[3]), argv[4:]
        fit_level = kmeans._fit_level

        def killed_at_level(items, cfg, i, rng):
            if i == level and RANK == victim:
                os.kill(os.getpid(), signal.SIGKILL)
            return fit_level(items, cfg, i, rng)

        kmeans._fit_level = killed_at_level
    if argv[:1] == ["--fail-rank"]:
        victim, argv = int(argv[1]), argv[2:]
        lloyd = kmeans.lloyd

        def failing_lloyd(*args, **kwargs):
            if RANK == victim:
                raise DataError(f"planted failure on rank {RANK}")
            return lloyd(*args, **kwargs)

        kmeans.lloyd = failing_lloyd
    return main(argv)


if __name__ == "__main__":
    scenario, out, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    from dinoscale.distributed import process_group

    if scenario == "cli":
        sys.exit(cli(rest))
    with process_group():
        if scenario == "algorithms":
            algorithms(out)
        elif scenario == "rings":
            rings(out, [int(s) for s in rest])
        elif scenario == "disagree":
            disagree()
