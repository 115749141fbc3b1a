"""The whole curation (dedup + 3-level hierarchical k-means + balanced sampling) on embeddings that stay
on disk, at 10^5, 10^6 and 10^7 points, on 1 process and on 2 (torchrun, gloo) in the same run.

Data: 256-d float16 L2-normalised embeddings in a row store (`dinoscale.curation.store`, 512 MB per
10^6 points), points around N/1000 centres of Zipf-distributed sizes, 5% of them near-duplicate
copies (cosine > 0.99) of others and a fifth of those also exact copies (the same content hash). Every
process reads its own rows through memory maps; nothing holds all embeddings.

Settings (stated here because they set the cost; the same at every size so that the growth exponent
measures the pool, not the settings):
  dedup      k = 16, threshold 0.9; exact index below 250,000 points, above it an 8-bit inverted
             file of 4 sqrt(N) lists scanning nprobe = 2 of them (on the first 10^6 points of the 10^7
             pool it keeps 18 more than nprobe = 8, of 47,552 removed; with 8 the list scans alone took
             about 2 hours at 10^7 on 2 cores)
  k-means    1,000 / 100 / 10 clusters; the first level fits on all points with 10 Lloyd iterations
             and no resampling (as the published web configuration's first level), the upper levels
             with 3 resampling steps of 5 points per cluster (half the mean cluster size); bf16 Lloyd
             searches
  sampling   N / 10 points, random within the leaves

Per size and number of processes: wall time of each stage and in all (the slowest rank), CPU time
(all ranks), peak resident memory per process against the size of the embeddings on disk, and
whether the 2-process result (dedup kept set, every level's assignment, the sample) equals the
1-process one. Then the growth exponents over the sizes, and the 2-process speed-up.

    python -m benchmarks.bench_curation_scale [--sizes 100000 1000000 10000000] [--processes 1 2]
        [--one-process-max-n 1000000] [--data DIR]

The data is written once per size into DIR (default: a temporary folder, removed afterwards). Sizes
above `--one-process-max-n` run on more than one process only (on 2 cores the 1-process run of 10^7
points would take about twice the 2-process one, which is about an hour).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dinoscale.utils.machine import describe_machine, peak_rss_mib

DIM = 256
CHUNK = 65536
DEDUP = {"k": 16, "threshold": 0.9, "nprobe": 2}
KMEANS = {"n_clusters": [1000, 100, 10], "n_resampling_steps": [0, 3, 3], "sample_size": [1, 5, 5], "n_iter": 10}


# ----------------------------------------------------------------------------- data
def write_pool(directory: Path, n: int, seed: int = 0) -> None:
    """The benchmark's pool as a row store in `directory` (embeddings, content_hashes), chunk by chunk."""
    from dinoscale.curation.store import write_parts_listing

    rng = np.random.default_rng(seed)
    n_centres = max(n // 1000, 10)
    weights = 1.0 / np.arange(1, n_centres + 1) ** 1.1
    centres = rng.standard_normal((n_centres, DIM)).astype(np.float32)
    part = directory / "part"
    part.mkdir(parents=True, exist_ok=True)
    x = np.lib.format.open_memmap(part / "embeddings.npy", mode="w+", dtype=np.float16, shape=(n, DIM))
    hashes = np.lib.format.open_memmap(part / "content_hashes.npy", mode="w+", dtype="S16", shape=(n,))
    for lo in range(0, n, CHUNK):
        hi = min(lo + CHUNK, n)
        labels = rng.choice(n_centres, size=hi - lo, p=weights / weights.sum())
        rows = centres[labels] + rng.standard_normal((hi - lo, DIM)).astype(np.float32)
        ids = np.arange(lo, hi)
        # 5% near copies of an earlier row of the chunk, a fifth of them exact (same bytes, same hash)
        copies = np.flatnonzero(rng.random(hi - lo) < 0.05)
        copies = copies[copies > 0]
        originals = (rng.random(len(copies)) * copies).astype(np.int64)
        exact = rng.random(len(copies)) < 0.2
        noise = 0.05 * rng.standard_normal((len(copies), DIM)).astype(np.float32)  # cosine about 0.9995
        noise[exact] = 0
        rows[copies] = rows[originals] + noise
        ids[copies[exact]] = lo + originals[exact]
        x[lo:hi] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        hashes[lo:hi] = np.char.encode(np.char.zfill(ids.astype(str), 16))
    x.flush()
    hashes.flush()
    del x, hashes
    write_parts_listing(directory, [part], n)


# ----------------------------------------------------------------------------- one rank's work
def worker(data: Path, out: Path) -> None:
    """Every stage on this rank; appends one JSON line (this rank's figures) to `out`."""
    import torch.distributed as dist

    from dinoscale.curation.config import DedupConfig, KMeansConfig, SamplingConfig
    from dinoscale.curation.dedup import deduplicate
    from dinoscale.curation.kmeans import fit_hierarchical_kmeans
    from dinoscale.curation.sampling import hierarchical_sample
    from dinoscale.curation.store import RowStore, RowSubset
    from dinoscale.distributed import process_group

    with process_group() as info:
        x = RowStore.open(data, "embeddings")
        hashes = RowStore.open(data, "content_hashes")
        times: dict[str, dict[str, float]] = {}

        def timed(name, fn, *args, **kwargs):
            if dist.is_initialized():
                dist.barrier()
            wall, cpu = time.perf_counter(), time.process_time()
            result = fn(*args, **kwargs)
            times[name] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
            return result

        dedup = timed("dedup", deduplicate, x, DedupConfig(**DEDUP), hashes=hashes)
        survivors = np.flatnonzero(dedup.keep)
        tree = timed("kmeans", fit_hierarchical_kmeans, RowSubset(x, survivors), KMeansConfig(**KMEANS), seed=0)
        sample = timed("sampling", hierarchical_sample, tree, SamplingConfig(target_size=len(x) // 10), seed=0)
        digest = hashlib.sha256()
        for array in (dedup.keep, *(level.assignment for level in tree.levels), sample.indices):
            digest.update(np.ascontiguousarray(array).tobytes())
        record = {"rank": info.rank, "world": info.world_size, "stages": times,
                  "peak_rss_mib": peak_rss_mib(),
                  "kept": int(dedup.keep.sum()), "clusters": [level.n_clusters for level in tree.levels],
                  "result_digest": digest.hexdigest()[:16]}
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- the runs
def run(data: Path, processes: int) -> dict:
    """The curation of the pool in `data` on `processes` ranks, as one figure set."""
    with tempfile.TemporaryDirectory() as tmp:
        lines = Path(tmp) / "ranks.jsonl"
        module = ["-m", "benchmarks.bench_curation_scale", "--worker", str(data), str(lines)]
        command = [sys.executable, *module] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *module]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{processes} process(es) on {data}: {done.stderr[-2000:]}")
        ranks = [json.loads(line) for line in lines.read_text().splitlines()]
    stages = {name: {"wall_s": round(max(r["stages"][name]["wall_s"] for r in ranks), 2),
                     "cpu_s": round(sum(r["stages"][name]["cpu_s"] for r in ranks), 2)} for name in ranks[0]["stages"]}
    digests = {r["result_digest"] for r in ranks}
    return {"processes": processes, "wall_s": round(sum(s["wall_s"] for s in stages.values()), 2),
            "cpu_s": round(sum(s["cpu_s"] for s in stages.values()), 2), "launch_wall_s": round(wall, 1),
            "stages": stages, "peak_rss_mib_per_process": round(max(r["peak_rss_mib"] for r in ranks), 1),
            "kept": ranks[0]["kept"], "clusters": ranks[0]["clusters"],
            "result_digest": digests.pop() if len(digests) == 1 else "ranks differ"}


def growth_exponent(sizes: list[int], values: list[float]) -> float | None:
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0]) if len(sizes) > 1 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--one-process-max-n", type=int, default=None,
                        help="the largest size that also runs on 1 process (default: every size)")
    parser.add_argument("--data", type=Path, default=None, help="where the pools are written (kept if given)")
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    root = args.data or Path(tempfile.mkdtemp(prefix="curation_scale_"))
    rows = []
    try:
        for n in args.sizes:
            data = root / f"pool_{n}"
            if not (data / "rows.json").exists():
                start = time.perf_counter()
                write_pool(data, n)
                print(f"wrote {n:,} points in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            row = {"n": n, "embeddings_mib": round(n * DIM * 2 / 2 ** 20, 1), "runs": []}
            for p in args.processes:
                if p == 1 and args.one_process_max_n is not None and n > args.one_process_max_n:
                    continue
                row["runs"].append(run(data, p))
                print(f"{n:,} points, {p} process(es): {json.dumps(row['runs'][-1])}", file=sys.stderr, flush=True)
            by = {r["processes"]: r for r in row["runs"]}
            if 1 in by and 2 in by:
                row["speedup_2_vs_1"] = round(by[1]["wall_s"] / by[2]["wall_s"], 2)
                row["cpu_ratio_2_vs_1"] = round(by[1]["cpu_s"] / by[2]["cpu_s"], 2)
                row["same_result_1_and_2_processes"] = by[1]["result_digest"] == by[2]["result_digest"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.data is None:
                shutil.rmtree(data)
    finally:
        if args.data is None:
            shutil.rmtree(root, ignore_errors=True)
    report = {"benchmark": "curation_scale", "machine": describe_machine(),
              "dim": DIM, "dtype": "float16", "dedup": DEDUP, "kmeans": KMEANS, "results": rows}
    for p in args.processes:
        runs = [(r["n"], x) for r in rows for x in r["runs"] if x["processes"] == p]
        for measure in ("wall_s", "cpu_s"):
            report[f"growth_exponent_{measure[:-2]}_{p}_process"] = growth_exponent(
                [n for n, _ in runs], [x[measure] for _, x in runs])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
