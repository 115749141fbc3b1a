"""Training-step throughput and MFU of dinoscale's full objective (DINO + iBOT + KoLeo + Gram anchoring,
separate heads, EMA and Gram teachers) on a ViT-S/16 with a CPU-sized crop set, against a DINO-only
step built with the lightly library on the same backbone, crops, batch and precision (lightly's
DINOProjectionHead, DINOLoss and update_momentum, one forward per crop as its examples do); the full
objective in 1 process vs 2 processes; peak memory without and with activation checkpointing; and
torch.compile.

On a shared machine timings drift by tens of percent within a minute, so the comparison with lightly
runs in one process: lightly's step, the full objective's step (`train_step`, what the trainer runs)
and the same without Gram alternate, each on the next batch of one stream (data loading included), and
a ratio is the median of the per-step ratios. The trainer itself (`train`) runs in subprocesses (clean
peak memory; torchrun for 2 ranks), once per round. Every figure is the median over `--repeats`
rounds; images/s is the batch over the median step time, the first `WARMUP_STEPS` steps left out. The
same per CPU-second of the training process (`*_cpu_*`; data-loader workers not counted) is steadier
still when other jobs share the cores.

MFU counts the backbone and head matmuls against the bf16 matmul peak, measured once here (best of
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
from typing import Callable

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


def worker_trainer(pool: str, batch: int, steps: int, out: str, peak_flops: float, extra: list[str]) -> dict:
    """The trainer's own loop, as `dinoscale train` runs it."""
    from dinoscale.eval.report import read_metrics
    from dinoscale.train.trainer import train

    train(_config(pool, batch, steps, out, peak_flops, extra))
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    metrics = read_metrics(Path(out) / "metrics.jsonl")  # rank 0 writes it
    timed = metrics[WARMUP_STEPS:]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cpu_seconds = world_size * statistics.median(m["cpu_seconds"] for m in timed)  # the ranks are alike
    return {"images_per_s": statistics.median(m["images_per_s"] for m in timed),
            "images_per_cpu_s": batch * world_size / cpu_seconds,
            "mfu": statistics.median(m["mfu"] for m in timed), "peak_flops": metrics[0]["peak_flops"],
            "first_step_s": metrics[0]["seconds"]}


def _lightly_dino_step(cfg, batch: int,
                       autocast: torch.autocast) -> tuple[Callable[[int, dict], None], Callable[[dict], float]]:
    """lightly's DINO training step on our backbone, as lightly's DINO example writes it; and its FLOPs."""
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import update_momentum

    from dinoscale.models import build_backbone
    from dinoscale.train.metrics import backbone_forward_flops, head_forward_flops

    student_backbone = build_backbone(cfg.student)
    student_head = DINOProjectionHead(384, 2048, 256, PROTOTYPES)
    teacher_backbone = copy.deepcopy(student_backbone)
    teacher_head = DINOProjectionHead(384, 2048, 256, PROTOTYPES)  # its weight_norm cannot be deep-copied
    teacher_head.load_state_dict(student_head.state_dict())
    for p in list(teacher_backbone.parameters()) + list(teacher_head.parameters()):
        p.requires_grad = False
    criterion = DINOLoss(output_dim=PROTOTYPES)
    optimizer = torch.optim.AdamW(list(student_backbone.parameters()) + list(student_head.parameters()), lr=1e-4)

    def step(iteration: int, data: dict) -> None:
        # lightly's views: one tensor per crop (our batches are crop-major)
        views = list(data["collated_global_crops"].split(batch)) + list(data["collated_local_crops"].split(batch))
        with autocast:
            teacher_out = [teacher_head(teacher_backbone(v)) for v in views[:2]]
            student_out = [student_head(student_backbone(v)) for v in views]
            loss = criterion(teacher_out, student_out, epoch=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        update_momentum(student_backbone, teacher_backbone, m=0.996)
        update_momentum(student_head, teacher_head, m=0.996)

    tokens_g, tokens_l = (GLOBAL_SIZE // 16) ** 2 + 1, (LOCAL_SIZE // 16) ** 2 + 1
    flops = 3 * (backbone_forward_flops(student_backbone, 2 * batch, tokens_g)
                 + backbone_forward_flops(student_backbone, N_LOCAL * batch, tokens_l)
                 + head_forward_flops(student_head, (2 + N_LOCAL) * batch)) \
        + backbone_forward_flops(student_backbone, 2 * batch, tokens_g) + head_forward_flops(student_head, 2 * batch)
    return step, lambda data: flops


def _dinoscale_step(cfg, batch: int, autocast: torch.autocast,
                    run_dir: Path) -> tuple[Callable[[int, dict], None], Callable[[dict], float]]:
    """The trainer's step (`train_step`) of `cfg` in one process; and its FLOPs."""
    from dinoscale.train.optim import build_optimizer
    from dinoscale.train.ssl import SSLMetaArch
    from dinoscale.train.trainer import step_flops, train_step

    model = SSLMetaArch(cfg, batch)
    optimizer = build_optimizer(model.student, cfg)

    def step(iteration: int, data: dict) -> None:
        train_step(model, optimizer, data, iteration, cfg, autocast, 0, run_dir)

    return step, lambda data: step_flops(model, data)


def worker_interleaved(pool: str, batch: int, steps: int, out: str, peak_flops: float) -> dict:
    """lightly's DINO-only step, the full objective's step and the step without Gram, alternating in one
    process, each on the next batch of one stream."""
    from dinoscale.data.stream import make_loader
    from dinoscale.train.distributed import DistInfo
    from dinoscale.train.trainer import build_stream
    from dinoscale.utils.device import autocast_dtype

    device = torch.device("cpu")
    dtype = autocast_dtype(device, "auto")
    autocast = torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    full = _config(pool, batch, steps, out, peak_flops, [])
    without_gram = _config(pool, batch, steps, out, peak_flops, ["gram.use_loss=false"])
    steppers = {"lightly_dino_only": _lightly_dino_step(full, batch, autocast),
                "full_objective": _dinoscale_step(full, batch, autocast, Path(out)),
                "without_gram": _dinoscale_step(without_gram, batch, autocast, Path(out))}
    batches = iter(make_loader(build_stream(full, DistInfo(0, 1, 0, device), 0), 1))
    timings: dict[str, list[tuple[float, float, float]]] = {name: [] for name in steppers}
    for iteration in range(steps):
        for name, (step, flops) in steppers.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            data = next(batches)
            step(iteration, data)
            timings[name].append((time.perf_counter() - start, time.process_time() - cpu_start, flops(data)))
    result = {}
    for name, rows in timings.items():
        rows = rows[WARMUP_STEPS:]
        seconds = statistics.median(r[0] for r in rows)
        result[name] = {"images_per_s": batch / seconds, "images_per_cpu_s": batch / statistics.median(r[1] for r in rows),
                        "mfu": statistics.median(r[2] / r[0] / peak_flops for r in rows)}
    lightly = timings["lightly_dino_only"][WARMUP_STEPS:]
    for name in ("full_objective", "without_gram"):
        pairs = list(zip(timings[name][WARMUP_STEPS:], lightly))
        result[name]["vs_lightly"] = statistics.median(b[0] / a[0] for a, b in pairs)
        result[name]["cpu_vs_lightly"] = statistics.median(b[1] / a[1] for a, b in pairs)
    return result


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
    `given`, the one-process peak, a rank's share is given / threads."""
    from dinoscale.train.metrics import measure_matmul_peak

    if given:
        return {threads: given, 1: given / threads}
    peaks = {}
    for n in (threads, 1):
        torch.set_num_threads(n)
        peaks[n] = measure_matmul_peak(torch.device("cpu"), torch.bfloat16, seconds=0.3, trials=10)
    torch.set_num_threads(threads)
    return peaks


def _medians(runs: list[dict]) -> dict:
    """The median of every number over the rounds, and the images/s of each round."""
    keys = [k for k in runs[0] if isinstance(runs[0][k], float)]
    return {**{k: statistics.median(r[k] for r in runs) for k in keys}, "rounds": [r["images_per_s"] for r in runs]}


def _ratio(a: list[dict], b: list[dict], key: str = "images_per_s") -> float:
    return statistics.median(x[key] / y[key] for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of runs")
    parser.add_argument("--peak-flops", type=float, help="bf16 matmul FLOP/s of one process (default: measured)")
    parser.add_argument("--worker", choices=["trainer", "interleaved"])
    parser.add_argument("--pool")
    parser.add_argument("--out", help="run directory of a worker")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides of a trainer worker")
    args = parser.parse_args()

    if args.worker:
        if args.worker == "trainer":
            result = worker_trainer(args.pool, args.batch, args.steps, args.out, args.peak_flops, args.set)
        else:
            result = worker_interleaved(args.pool, args.batch, args.steps, args.out, args.peak_flops)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps({**result, "peak_rss_mb": _peak_rss_mb()}))
        return

    from dinoscale.data.synthetic import SyntheticSpec, make_synthetic_pool

    threads = torch.get_num_threads()
    peaks = _matmul_peaks(threads, args.peak_flops)
    trainer_runs = {  # name: (processes, overrides)
        "full_1": (1, []),
        "full_2": (2, []),
        "selective_ac": (1, ["train.activation_checkpointing=selective"]),
        "full_ac": (1, ["train.activation_checkpointing=full"]),
        "compile": (1, ["train.compile=true"]),
    }
    last_round_only = ("selective_ac", "full_ac", "compile")  # compared with that round's full_1
    runs: dict[str, list[dict]] = {name: [] for name in ("interleaved", *trainer_runs)}
    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic_pool(tmp, SyntheticSpec(n_images=200, image_size=160, eval_per_class=1))
        common = ["--pool", str(Path(tmp) / "pool"), "--steps", str(args.steps)]
        for index in range(args.repeats):
            runs["interleaved"].append(_run(["--worker", "interleaved", *common, "--batch", str(args.batch),
                                             "--peak-flops", str(peaks[threads]),
                                             "--out", str(Path(tmp) / f"interleaved_{index}")]))
            for name, (nproc, overrides) in trainer_runs.items():
                if name in last_round_only and index < args.repeats - 1:
                    continue
                peak = peaks[threads] if nproc == 1 else peaks[1]
                runs[name].append(_run(["--worker", "trainer", *common, "--batch", str(args.batch // nproc),
                                        "--peak-flops", str(peak), "--out", str(Path(tmp) / f"{name}_{index}"),
                                        "--set", *overrides], nproc=nproc))

    interleaved = {name: _medians([r[name] for r in runs["interleaved"]])
                   for name in ("lightly_dino_only", "full_objective", "without_gram")}
    full, last_full = _medians(runs["full_1"]), runs["full_1"][-1]
    print(json.dumps({
        "benchmark": "train_step",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": threads, "torch": torch.__version__},
        "setup": {"backbone": "vit_small/16", "global_crops": f"2x{GLOBAL_SIZE}", "local_crops": f"{N_LOCAL}x{LOCAL_SIZE}",
                  "global_batch": args.batch, "prototypes": PROTOTYPES, "precision": "bf16 autocast",
                  "steps": args.steps, "timed_steps": args.steps - WARMUP_STEPS, "repeats": args.repeats},
        "matmul_peak_flops": {"one_process": peaks[threads], "per_rank_of_two": peaks[1],
                              "measured": not args.peak_flops},
        "one_process_interleaved_steps": interleaved,
        "ratio_full_objective_vs_lightly": interleaved["full_objective"]["vs_lightly"],
        "ratio_without_gram_vs_lightly": interleaved["without_gram"]["vs_lightly"],
        "cpu_ratio_full_objective_vs_lightly": interleaved["full_objective"]["cpu_vs_lightly"],
        "cpu_ratio_without_gram_vs_lightly": interleaved["without_gram"]["cpu_vs_lightly"],
        "trainer_full_objective_1_process": full,
        "trainer_full_objective_2_processes": _medians(runs["full_2"]),
        "ratio_2_vs_1_process": _ratio(runs["full_2"], runs["full_1"]),
        "cpu_ratio_2_vs_1_process": _ratio(runs["full_2"], runs["full_1"], "images_per_cpu_s"),
        "activation_checkpointing": {
            "none": {"peak_rss_mb": full["peak_rss_mb"]},
            **{mode: {"peak_rss_mb": runs[f"{mode}_ac"][0]["peak_rss_mb"],
                      "speed_vs_none": runs[f"{mode}_ac"][0]["images_per_s"] / last_full["images_per_s"],
                      "cpu_speed_vs_none": runs[f"{mode}_ac"][0]["images_per_cpu_s"] / last_full["images_per_cpu_s"]}
               for mode in ("selective", "full")}},
        "compile": {"images_per_s": runs["compile"][0]["images_per_s"],
                    "speed_vs_eager": runs["compile"][0]["images_per_s"] / last_full["images_per_s"],
                    "cpu_speed_vs_eager": runs["compile"][0]["images_per_cpu_s"] / last_full["images_per_cpu_s"],
                    "first_step_s": runs["compile"][0]["first_step_s"], "eager_first_step_s": last_full["first_step_s"]},
    }, indent=2))


if __name__ == "__main__":
    main()
