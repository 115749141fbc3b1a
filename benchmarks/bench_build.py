"""Peak host memory of building the SSL model (student, EMA teacher, Gram teacher) for training.

Sharded: the trainer's build (`dinoscale.train.build`): meta device, FSDP2, each rank materialising
only its shards; `--nproc` ranks under torchrun (gloo), each reporting its peak resident memory.
Baseline: the whole model built eagerly in one process and then sharded over a world of one —
what every rank held before the sharded build, whatever the number of ranks (one process: two whole
copies of ViT-g, ~15 GB each, would not fit in the RAM of a laptop-sized machine). All runs are
subprocesses, one after the other.

Above its shards, a rank's peak holds the process itself (torch, gloo) and freed memory that glibc's
heap keeps resident: torch's `trunc_normal_` allocates three byte masks the size of the tensor for
its rejection test, and once glibc has raised its mmap threshold (up to 32 MiB) those temporaries
come from the heap, whose holes are not returned. The sharded build is therefore also run with
`MALLOC_MMAP_THRESHOLD_=131072` (a fixed threshold: every block above 128 KiB is mapped and unmapped
on its own), which leaves only a fixed overhead above the shards. On a GPU the shards live in device
memory and the host holds only one module's full tensors.

A dry build of a larger model on the meta device (no memory) reports what each rank would hold on
larger worlds: fp32 parameters, gradients and AdamW's two moments of the student, fp32 teacher and
Gram teacher, all sharded over the ranks as FSDP2 does (dim-0 chunks, the largest on rank 0), and
the full tensors of the largest module the sharded build materialises at once.

    python -m benchmarks.bench_build [--arch vit_giant2] [--nproc 2] [--dry-arch vit_7b] [--dry-ranks 8 64 256]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

from dinoscale.train.memory import BYTES_FP32, GIB, training_memory
from dinoscale.utils.machine import current_rss_mib, describe_machine, peak_rss_mib

FIXED_MMAP_THRESHOLD = 128 * 1024  # bytes: glibc's default, kept fixed


def model_config(arch: str, extra: list[str] = ()):
    from dinoscale.config import load_config

    return load_config(None, [f"student.arch={arch}", "gram.use_loss=true", "train.batch_size_per_gpu=1",
                              "train.mixed_precision=fp32", *extra])


# ----------------------------------------------------------------------------- workers (subprocesses)
def eager_worker(arch: str) -> dict:
    """Before the sharded build: the whole model built eagerly, then sharded over a world of one."""
    from dinoscale.distributed import process_group
    from dinoscale.train.parallel import parallelize
    from dinoscale.train.ssl import SSLMetaArch

    cfg = model_config(arch)
    with process_group() as info:
        rss_before, start = current_rss_mib(), time.perf_counter()
        torch.manual_seed(cfg.seed)
        model = SSLMetaArch(cfg)
        parallelize(model.branches(), info.device, 1, torch.float32, checkpointed=[model.student])
        seconds = time.perf_counter() - start
        return {"peak_rss_mib": peak_rss_mib(), "rss_before_build_mib": rss_before, "seconds": seconds,
                "params": sum(p.numel() for p in model.parameters())}


def sharded_worker(arch: str) -> dict | None:
    """The sharded build on every rank of torchrun; rank 0 returns every rank's figures."""
    import torch.distributed as dist

    from dinoscale.train.build import build_sharded_model
    from dinoscale.distributed import process_group
    from dinoscale.train.ssl import local_tensors

    cfg = model_config(arch)
    with process_group() as info:
        rss_before, start = current_rss_mib(), time.perf_counter()
        model = build_sharded_model(cfg, info.device, info.world_size)
        seconds = time.perf_counter() - start
        local = sum(t.numel() for branch in model.branches() for t in local_tensors(branch))
        mine = {"rank": info.rank, "peak_rss_mib": peak_rss_mib(), "rss_before_build_mib": rss_before,
                "seconds": seconds, "local_elements": local}
        ranks = [None] * info.world_size
        dist.all_gather_object(ranks, mine)
        return {"world_size": info.world_size, "ranks": ranks} if info.rank == 0 else None


def run_worker(command: list[str], env: dict[str, str] | None = None) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(command[-4:])} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- dry build
def dry_build(arch: str, world_sizes: list[int]) -> dict:
    """Per-rank bytes of training `arch` with FSDP2 on each world size, from the model built on meta."""
    from dinoscale.train.ssl import SSLMetaArch

    cfg = model_config(arch)
    with torch.device("meta"):
        model = SSLMetaArch(cfg)
    counts = {name: sum(p.numel() for p in branch.parameters())
              for name, branch in zip(("student", "teacher", "gram_teacher"), model.branches())}
    buffers = sum(b.numel() for b in model.buffers()) * BYTES_FP32
    unsharded = sum(counts.values()) * BYTES_FP32 + buffers
    return {"arch": arch, "params": counts, "unsharded_weights_per_rank_before_gib": unsharded / GIB,
            "per_rank": {str(ranks): training_memory(model, ranks) for ranks in world_sizes}}


def expected_local_elements(arch: str, ranks: int, rank: int) -> int:
    """The shard sizes dry_build assumes, for one rank: to check them against a real sharded build."""
    from dinoscale.train.ssl import SSLMetaArch

    cfg = model_config(arch)
    with torch.device("meta"):
        model = SSLMetaArch(cfg)
    total = 0
    for branch in model.branches():
        for p in branch.parameters():
            rows = math.ceil(p.shape[0] / ranks)
            total += max(0, min(rows, p.shape[0] - rank * rows)) * (p.numel() // p.shape[0])
        total += sum(b.numel() for b in branch.buffers())
    return total


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_giant2", help="model built for real, sharded and not")
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the sharded build")
    parser.add_argument("--dry-arch", default="vit_7b", help="model of the dry build")
    parser.add_argument("--dry-ranks", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--worker", choices=["eager", "sharded"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "eager":
        print(json.dumps(eager_worker(args.arch)))
        return
    if args.worker == "sharded":
        result = sharded_worker(args.arch)
        if result is not None:
            print(json.dumps(result))
        return

    module = [sys.executable, "-m", "benchmarks.bench_build", "--arch", args.arch]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                *module[1:], "--worker", "sharded"]
    sharded = run_worker(torchrun)
    sharded_fixed_threshold = run_worker(torchrun, env={"MALLOC_MMAP_THRESHOLD_": str(FIXED_MMAP_THRESHOLD)})
    eager = run_worker([*module, "--worker", "eager"], env={"OMP_NUM_THREADS": "1"})  # as torchrun sets per rank
    worst, worst_fixed = (max(run["ranks"], key=lambda r: r["peak_rss_mib"])
                          for run in (sharded, sharded_fixed_threshold))
    formula_ok = all(r["local_elements"] == expected_local_elements(args.arch, args.nproc, r["rank"])
                     for r in sharded["ranks"])
    print(json.dumps({
        "arch": args.arch,
        "params": eager["params"],
        "eager_full_copy_per_rank": eager,
        "sharded": sharded,
        "sharded_fixed_mmap_threshold": sharded_fixed_threshold,
        "sharded_peak_rss_per_rank_mib": worst["peak_rss_mib"],
        "sharded_fixed_mmap_threshold_peak_rss_per_rank_mib": worst_fixed["peak_rss_mib"],
        "eager_peak_rss_mib": eager["peak_rss_mib"],
        "memory_ratio_eager_vs_sharded": eager["peak_rss_mib"] / worst["peak_rss_mib"],
        "shards_per_rank_mib": [r["local_elements"] * BYTES_FP32 / 2**20 for r in sharded["ranks"]],
        # what the build adds above the shards and the process before it, per rank
        "build_overhead_mib": {run: [r["peak_rss_mib"] - r["rss_before_build_mib"]
                                     - r["local_elements"] * BYTES_FP32 / 2**20 for r in out["ranks"]]
                               for run, out in (("default", sharded), ("fixed_mmap_threshold", sharded_fixed_threshold))},
        "dry_build_shard_sizes_match_real_shards": formula_ok,
        "dry_build": dry_build(args.dry_arch, args.dry_ranks),
        "machine": describe_machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
