"""Training-step throughput and MFU of dinoscale's full objective (DINO + iBOT + KoLeo + Gram anchoring,
separate heads, EMA and Gram teachers) on a ViT-S/16 with a CPU-sized crop set: 1 process vs 2 processes,
the same without Gram, peak memory without and with activation checkpointing, torch.compile, and a
DINO-only step built with the lightly library on the same backbone, crops, batch and precision
(lightly's DINOProjectionHead, DINOLoss and update_momentum, one forward per crop as its examples do).

Every configuration runs in its own subprocess (clean peak memory; torchrun for 2 ranks) on the same
synthetic images. On a shared machine timings drift: lightly and the dinoscale configurations alternate
for `--repeats` rounds, a ratio is the median of the per-round ratios, and images/s is the batch over the
median step time (data loading included, the first `WARMUP_STEPS` steps left out). The same per
CPU-second of the training processes (`cpu_ratio_*`; the data-loader worker not counted) is steadier
when other jobs share the cores. The matmul peak, the MFU denominator, is measured once here (best of
several runs) with all threads for one process and 1 thread for each of two ranks (torchrun's
OMP_NUM_THREADS=1), or given with --peak-flops, and handed to every worker (`train.peak_flops`).

    python -m benchmarks.bench_train [--steps 8] [--batch 16] [--repeats 3] [--peak-flops F]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GLOBAL_SIZE, LOCAL_SIZE, N_LOCAL = 128, 64, 4
PROTOTYPES = 4096
WARMUP_STEPS = 2


def _config(pool: str, batch: int, steps: int, out: str, peak_flops: float, extra: list[str]):
    from dinoscale.config import load_config

    return load_config(None, [
        "student.arch=vit_small", "student.patch_size=16", f"student.img_size={GLOBAL_SIZE}",
        f"dino.head_n_prototypes={PROTOTYPES}", f"ibot.head_n_prototypes={PROTOTYPES}", "gram.use_loss=true",
        f"crops.global_crops_size={GLOBAL_SIZE}", f"crops.local_crops_size={LOCAL_SIZE}",
        f"crops.local_crops_number={N_LOCAL}", f"train.batch_size_per_gpu={batch}", f"train.max_iterations={steps}",
        "train.num_workers=1", "train.mixed_precision=auto", f"train.peak_flops={peak_flops}",
        f"train.dataset_path={pool}", f"train.output_dir={out}", "train.checkpoint_period_iterations=100000",
        "train.log_period_iterations=1000", "optim.warmup_epochs=0", "teacher.warmup_teacher_temp_epochs=0", *extra,
    ])


def worker_dinoscale(pool: str, batch: int, steps: int, out: str, peak_flops: float, extra: list[str]) -> dict:
    from dinoscale.eval.report import read_metrics
    from dinoscale.train.trainer import train

    cfg = _config(pool, batch, steps, out, peak_flops, extra)
    train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    metrics = read_metrics(Path(out) / "metrics.jsonl")  # rank 0 writes it
    timed = metrics[WARMUP_STEPS:]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cpu_seconds = world_size * statistics.median(m["cpu_seconds"] for m in timed)  # ranks are alike
    return {"images_per_s": statistics.median(m["images_per_s"] for m in timed),
            "images_per_cpu_s": batch * world_size / cpu_seconds,
            "mfu": statistics.median(m["mfu"] for m in timed), "peak_flops": metrics[0]["peak_flops"],
            "first_step_s": metrics[0]["seconds"]}


def worker_lightly(pool: str, batch: int, steps: int, peak_flops: float) -> dict:
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import update_momentum

    from dinoscale.data.augment import MultiCropAugmentation
    from dinoscale.data.pool import open_pool
    from dinoscale.data.stream import BatchStream, Source, make_loader
    from dinoscale.models import build_backbone
    from dinoscale.train.metrics import backbone_forward_flops, head_forward_flops
    from dinoscale.utils.device import autocast_dtype

    cfg = _config(pool, batch, steps, "unused", peak_flops, [])
    device = torch.device("cpu")
    dtype = autocast_dtype(device, "auto") or torch.float32
    student_backbone = build_backbone(cfg.student)
    student_head = DINOProjectionHead(384, 2048, 256, PROTOTYPES)
    teacher_backbone = copy.deepcopy(student_backbone)
    teacher_head = DINOProjectionHead(384, 2048, 256, PROTOTYPES)  # its weight_norm cannot be deep-copied
    teacher_head.load_state_dict(student_head.state_dict())
    for p in list(teacher_backbone.parameters()) + list(teacher_head.parameters()):
        p.requires_grad = False
    criterion = DINOLoss(output_dim=PROTOTYPES)
    params = list(student_backbone.parameters()) + list(student_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    augment = MultiCropAugmentation.from_config(cfg)

    def collate(samples, generator):
        return {"views": [torch.stack([s["global_crops"][i] for s in samples]) for i in range(2)]
                + [torch.stack([s["local_crops"][i] for s in samples]) for i in range(N_LOCAL)]}

    stream = BatchStream([Source(open_pool(pool))], batch, 0, 1, 0, 0, augment, collate)
    loader = iter(make_loader(stream, 1))
    tokens_g, tokens_l = (GLOBAL_SIZE // 16) ** 2 + 1, (LOCAL_SIZE // 16) ** 2 + 1
    flops = 3 * (backbone_forward_flops(student_backbone, 2 * batch, tokens_g)
                 + backbone_forward_flops(student_backbone, N_LOCAL * batch, tokens_l)
                 + head_forward_flops(student_head, (2 + N_LOCAL) * batch)) \
        + backbone_forward_flops(student_backbone, 2 * batch, tokens_g) + head_forward_flops(student_head, 2 * batch)
    times, cpu_times = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()  # data loading included, as in the trainer
        views = next(loader)["views"]
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            teacher_out = [teacher_head(teacher_backbone(v)) for v in views[:2]]
            student_out = [student_head(student_backbone(v)) for v in views]
            loss = criterion(teacher_out, student_out, epoch=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        update_momentum(student_backbone, teacher_backbone, m=0.996)
        update_momentum(student_head, teacher_head, m=0.996)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    seconds = statistics.median(times[WARMUP_STEPS:])
    return {"images_per_s": batch / seconds, "images_per_cpu_s": batch / statistics.median(cpu_times[WARMUP_STEPS:]),
            "mfu": flops / seconds / peak_flops, "peak_flops": peak_flops}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run(args: list[str], nproc: int = 1) -> dict:
    command = [sys.executable, "-m", "benchmarks.bench_train", *args]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "benchmarks.bench_train", *args]
    # passive OpenMP waiting: spinning threads starve the other process (and the data worker) on small machines
    env = {"OMP_WAIT_POLICY": "passive", **os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return results[0]


def _matmul_peaks(threads: int, given: float | None) -> dict[int, float]:
    """bf16 matmul FLOP/s with `threads` threads (one process) and 1 thread (each of two ranks); from
    `given`, the one-process peak, that rank's share is given / threads."""
    from dinoscale.train.metrics import measure_matmul_peak

    if given:
        return {threads: given, 1: given / threads}
    peaks = {}
    for n in (threads, 1):
        torch.set_num_threads(n)
        peaks[n] = measure_matmul_peak(torch.device("cpu"), torch.bfloat16, seconds=0.3, trials=10)
    torch.set_num_threads(threads)
    return peaks


def _median_run(runs: list[dict]) -> dict:
    """The per-round results and their medians."""
    keys = [k for k in runs[0] if isinstance(runs[0][k], float)]
    return {**{k: statistics.median(r[k] for r in runs) for k in keys}, "rounds": [r["images_per_s"] for r in runs]}


def _ratio(a: list[dict], b: list[dict], key: str = "images_per_s") -> float:
    return statistics.median(x[key] / y[key] for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of lightly / dinoscale runs")
    parser.add_argument("--worker", choices=["dinoscale", "lightly"])
    parser.add_argument("--pool")
    parser.add_argument("--peak-flops", type=float, help="bf16 matmul FLOP/s of one process (default: measured)")
    parser.add_argument("--out", help="run directory of a worker")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides of a dinoscale worker")
    args = parser.parse_args()

    if args.worker:
        if args.worker == "dinoscale":
            result = worker_dinoscale(args.pool, args.batch, args.steps, args.out, args.peak_flops, args.set)
        else:
            result = worker_lightly(args.pool, args.batch, args.steps, args.peak_flops)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps({**result, "peak_rss_mb": _peak_rss_mb()}))
        return

    from dinoscale.data.synthetic import SyntheticSpec, make_synthetic_pool

    threads = torch.get_num_threads()
    peaks = _matmul_peaks(threads, args.peak_flops)
    configs = {  # name: (processes, overrides)
        "full_1": (1, []),
        "full_2": (2, []),
        "without_gram_1": (1, ["gram.use_loss=false"]),
        "selective_ac": (1, ["train.activation_checkpointing=selective"]),
        "full_ac": (1, ["train.activation_checkpointing=full"]),
        "compile": (1, ["train.compile=true"]),
    }
    every_round = ("full_1", "full_2", "without_gram_1")
    last_round_only = ("selective_ac", "full_ac", "compile")  # compared with that round's full_1
    runs: dict[str, list[dict]] = {name: [] for name in ("lightly", *configs)}
    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic_pool(tmp, SyntheticSpec(n_images=200, image_size=160, eval_per_class=1))
        pool = str(Path(tmp) / "pool")

        def run(name: str, index: int) -> None:
            nproc, overrides = configs[name]
            peak = peaks[threads] if nproc == 1 else peaks[1]
            out = Path(tmp) / f"{name}_{index}"
            runs[name].append(_run(["--worker", "dinoscale", "--pool", pool, "--steps", str(args.steps),
                                    "--batch", str(args.batch // nproc), "--peak-flops", str(peak), "--out", str(out),
                                    "--set", *overrides], nproc=nproc))

        for index in range(args.repeats):
            runs["lightly"].append(_run(["--worker", "lightly", "--pool", pool, "--steps", str(args.steps),
                                         "--batch", str(args.batch), "--peak-flops", str(peaks[threads])]))
            for name in every_round + (last_round_only if index == args.repeats - 1 else ()):
                run(name, index)

    full = _median_run(runs["full_1"])
    last_full = runs["full_1"][-1]
    print(json.dumps({
        "benchmark": "train_step",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": threads,
                    "torch": torch.__version__},
        "setup": {"backbone": "vit_small/16", "global_crops": f"2x{GLOBAL_SIZE}", "local_crops": f"{N_LOCAL}x{LOCAL_SIZE}",
                  "global_batch": args.batch, "prototypes": PROTOTYPES, "precision": "bf16 autocast",
                  "steps": args.steps, "timed_steps": args.steps - WARMUP_STEPS, "repeats": args.repeats},
        "matmul_peak_flops": {"one_process": peaks[threads], "per_rank_of_two": peaks[1],
                              "measured": not args.peak_flops},
        "lightly_dino_only": _median_run(runs["lightly"]),
        "dinoscale_full_objective_1_process": full,
        "dinoscale_full_objective_2_processes": _median_run(runs["full_2"]),
        "dinoscale_without_gram_1_process": _median_run(runs["without_gram_1"]),
        "activation_checkpointing": {
            "none": {"peak_rss_mb": full["peak_rss_mb"], "images_per_s": full["images_per_s"]},
            **{mode: {"peak_rss_mb": runs[f"{mode}_ac"][0]["peak_rss_mb"],
                      "speed_vs_none": runs[f"{mode}_ac"][0]["images_per_s"] / last_full["images_per_s"]}
               for mode in ("selective", "full")}},
        "compile": {"images_per_s": runs["compile"][0]["images_per_s"],
                    "speed_vs_eager": runs["compile"][0]["images_per_s"] / last_full["images_per_s"],
                    "first_step_s": runs["compile"][0]["first_step_s"],
                    "eager_first_step_s": last_full["first_step_s"]},
        "ratio_full_objective_vs_lightly": _ratio(runs["full_1"], runs["lightly"]),
        "ratio_without_gram_vs_lightly": _ratio(runs["without_gram_1"], runs["lightly"]),
        "ratio_2_vs_1_process": _ratio(runs["full_2"], runs["full_1"]),
        # the same per CPU-second of the training processes: steadier when other jobs share the cores
        "cpu_ratio_full_objective_vs_lightly": _ratio(runs["full_1"], runs["lightly"], "images_per_cpu_s"),
        "cpu_ratio_without_gram_vs_lightly": _ratio(runs["without_gram_1"], runs["lightly"], "images_per_cpu_s"),
        "cpu_ratio_2_vs_1_process": _ratio(runs["full_2"], runs["full_1"], "images_per_cpu_s"),
    }, indent=2))


if __name__ == "__main__":
    main()
