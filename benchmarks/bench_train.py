"""Training-step throughput and MFU of dinoscale's full objective (DINO + iBOT + KoLeo + Gram anchoring,
separate heads, EMA and Gram teachers) on a ViT-S/16 with a CPU-sized crop set, against a DINO-only
step built with the lightly library; the full objective in 1 process vs 2 processes; peak memory
without and with activation checkpointing; the Gram loss at image and batch level; and torch.compile.

Two lightly peers, both lightly's DINO recipe (DINOProjectionHead with its last layer frozen in the
first epoch, DINOLoss with centering, update_momentum on a cosine schedule, one forward per crop as
lightly's DINO example; AdamW as its DINOv2 example) with the same batch, crops, bf16 autocast and
threads:
- `lightly_dino_only`: the whole stack as a lightly user builds it: timm's `vit_small_patch16_224`
  (dynamic_img_size, as lightly's DINOv2 example; img_size 128 like dinoscale's student) and
  lightly's DINOTransform in a DataLoader with as many workers over the same images. Against it,
  dinoscale's backbone (attention path, same-size crops in one forward), fused AdamW and EMA, and
  its data pipeline count.
- `lightly_dino_only_dinoscale_backbone`: the same lightly objective on dinoscale's ViT-S/16 and
  batch stream: against it only the objective and the optimiser differ.
The full objective does more work per image than either: an iBOT head on the masked patches,
KoLeo, the Gram teacher's forward and the Gram loss, gradient clipping.

On a shared machine timings drift by tens of percent within a minute, so the peers and the
dinoscale steps (`train_step` of `build_model`, what the trainer runs: the full objective, with Gram
at batch level, and without Gram) alternate step by step in one process, each on the next batch of
its own stream (data loading included), and a ratio is the median of the per-step ratios. The
trainer itself (`train`) runs in subprocesses (clean peak memory; torchrun for 2 ranks), once per
round, and so does the timm peer alone for its peak memory. Every figure is the median over
`--repeats` rounds; images/s is the batch over the median step time, the first `WARMUP_STEPS` steps
left out. The same per CPU-second of the training process (`*_cpu_*`; data-loader workers not
counted) is steadier still when other jobs share the cores.

MFU counts the backbone and head matmuls against the bf16 matmul peak, measured once here (best of
several runs) with all threads for one process and 1 thread for each of two ranks (torchrun's
OMP_NUM_THREADS=1), or given with --peak-flops, and handed to every worker (`train.peak_flops`).

    python -m benchmarks.bench_train [--steps 8] [--batch 16] [--repeats 3] [--peak-flops F]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dinoscale.utils.machine import describe_machine, peak_rss_mib

GLOBAL_SIZE, LOCAL_SIZE, N_LOCAL = 128, 64, 4
PROTOTYPES = 4096
NUM_WORKERS = 1
WARMUP_STEPS = 2
LIGHTLY_PEERS = ("lightly_dino_only", "lightly_dino_only_dinoscale_backbone")
DINOSCALE_STEPS = {"full_objective": [], "full_objective_batch_gram": ["gram.img_level=false"],
                   "without_gram": ["gram.use_loss=false"]}
GRAM_VARIANTS = ("image", "batch", "batch_materialised")

# batches, a training step on one of them, and its matmul FLOPs
Stepper = tuple[Iterator[Any], Callable[[int, Any], None], Callable[[Any], float]]


def _config(pool: str, batch: int, steps: int, out: str, peak_flops: float, extra: list[str]):
    from dinoscale.config import load_config

    return load_config(None, [
        "student.arch=vit_small", "student.patch_size=16", f"student.img_size={GLOBAL_SIZE}",
        f"dino.head_n_prototypes={PROTOTYPES}", f"ibot.head_n_prototypes={PROTOTYPES}", "gram.use_loss=true",
        f"crops.global_crops_size={GLOBAL_SIZE}", f"crops.local_crops_size={LOCAL_SIZE}",
        f"crops.local_crops_number={N_LOCAL}", f"train.batch_size_per_gpu={batch}", f"train.max_iterations={steps}",
        f"train.num_workers={NUM_WORKERS}", "train.mixed_precision=auto", f"train.peak_flops={peak_flops}",
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


def _forever(loader: torch.utils.data.DataLoader) -> Iterator[Any]:
    while True:
        yield from loader


class _LightlyViews(torch.utils.data.Dataset):
    """The pool's readable images through lightly's DINOTransform with dinoscale's crop settings: the
    dataset a lightly user writes (undecodable images left out up front; dinoscale skips them itself)."""

    def __init__(self, pool_path: str, cfg):
        from lightly.transforms import DINOTransform

        from dinoscale.data.pool import open_pool

        self.pool = open_pool(pool_path)
        self.indices = [i for i in range(len(self.pool)) if self.pool.load(i) is not None]
        self.transform = DINOTransform(global_crop_size=GLOBAL_SIZE, global_crop_scale=tuple(cfg.crops.global_crops_scale),
                                       local_crop_size=LOCAL_SIZE, local_crop_scale=tuple(cfg.crops.local_crops_scale),
                                       n_local_views=N_LOCAL)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        return self.transform(self.pool.load(self.indices[index]).convert("RGB"))


def _lightly_dino(backbone: nn.Module, views: Callable[[Any], list[torch.Tensor]], batch: int, steps: int,
                  autocast: torch.autocast) -> tuple[Callable[[int, Any], None], Callable[[Any], float]]:
    """lightly's DINO training step on `backbone` (its CLS embedding per image), `views(data)` giving
    the crops of a batch, globals first; and its FLOPs."""
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    from dinoscale.train.metrics import backbone_forward_flops, head_forward_flops

    dim = backbone.embed_dim
    student_head = DINOProjectionHead(dim, 2048, 256, PROTOTYPES, freeze_last_layer=1)
    teacher_backbone = copy.deepcopy(backbone)
    teacher_head = DINOProjectionHead(dim, 2048, 256, PROTOTYPES)  # its weight_norm cannot be deep-copied
    teacher_head.load_state_dict(student_head.state_dict())
    deactivate_requires_grad(teacher_backbone)
    deactivate_requires_grad(teacher_head)
    criterion = DINOLoss(output_dim=PROTOTYPES)
    optimizer = torch.optim.AdamW(list(backbone.parameters()) + list(student_head.parameters()), lr=1e-3)

    def step(iteration: int, data: Any) -> None:
        momentum = cosine_schedule(iteration, steps, 0.996, 1.0)
        update_momentum(backbone, teacher_backbone, m=momentum)
        update_momentum(student_head, teacher_head, m=momentum)
        crops = views(data)
        with autocast:
            teacher_out = [teacher_head(teacher_backbone(v)) for v in crops[:2]]
            student_out = [student_head(backbone(v)) for v in crops]
            loss = criterion(teacher_out, student_out, epoch=0)
        loss.backward()
        student_head.cancel_last_layer_gradients(current_epoch=0)
        optimizer.step()
        optimizer.zero_grad()

    tokens_g, tokens_l = (GLOBAL_SIZE // 16) ** 2 + 1, (LOCAL_SIZE // 16) ** 2 + 1
    flops = 3 * (backbone_forward_flops(backbone, 2 * batch, tokens_g)
                 + backbone_forward_flops(backbone, N_LOCAL * batch, tokens_l)
                 + head_forward_flops(student_head, (2 + N_LOCAL) * batch)) \
        + backbone_forward_flops(backbone, 2 * batch, tokens_g) + head_forward_flops(student_head, 2 * batch)
    return step, lambda data: flops


def _lightly_timm_stepper(pool: str, cfg, batch: int, steps: int, autocast: torch.autocast) -> Stepper:
    """lightly's DINO as a lightly user builds it: timm's ViT-S/16 and lightly's data pipeline."""
    from timm.models.vision_transformer import vit_small_patch16_224

    backbone = vit_small_patch16_224(img_size=GLOBAL_SIZE, dynamic_img_size=True, num_classes=0)
    loader = torch.utils.data.DataLoader(_LightlyViews(pool, cfg), batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=NUM_WORKERS, persistent_workers=NUM_WORKERS > 0)
    return (_forever(loader), *_lightly_dino(backbone, lambda views: views, batch, steps, autocast))


def _crops(data: dict, batch: int) -> list[torch.Tensor]:
    """One tensor per crop, as lightly's views (dinoscale's batches are crop-major)."""
    return list(data["collated_global_crops"].split(batch)) + list(data["collated_local_crops"].split(batch))


def _dinoscale_step(cfg, autocast: torch.autocast) -> tuple[Callable[[int, dict], None], Callable[[dict], float]]:
    """The trainer's step (`train_step`) of the trainer's model (`build_model`) in one process; and its FLOPs."""
    from dinoscale.train.build import build_model
    from dinoscale.train.metrics import step_flops
    from dinoscale.train.schedules import build_schedules
    from dinoscale.train.trainer import train_step

    model, optimizer = build_model(cfg, torch.device("cpu"), 1)
    schedules = build_schedules(cfg, cfg.train.batch_size_per_gpu)

    def step(iteration: int, data: dict) -> None:
        train_step(model, optimizer, schedules, data, iteration, clip_grad=cfg.optim.clip_grad, autocast=autocast,
                   seed=iteration)

    return step, lambda data: step_flops(model, data)


def _autocast() -> torch.autocast:
    from dinoscale.utils.device import autocast_dtype

    dtype = autocast_dtype(torch.device("cpu"), "auto")
    return torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _steppers(pool: str, batch: int, steps: int, out: str, peak_flops: float, names: tuple[str, ...]) -> dict[str, Stepper]:
    from dinoscale.data.stream import make_loader
    from dinoscale.models import build_backbone
    from dinoscale.data.stream import build_stream

    autocast = _autocast()
    cfg = _config(pool, batch, steps, out, peak_flops, [])

    @functools.cache
    def stream() -> Iterator[dict]:  # dinoscale's batch stream, shared by the steppers that use it
        return iter(make_loader(build_stream(cfg, 0, 1, 0), NUM_WORKERS))

    builders = {
        "lightly_dino_only": lambda: _lightly_timm_stepper(pool, cfg, batch, steps, autocast),
        "lightly_dino_only_dinoscale_backbone": lambda: (stream(), *_lightly_dino(
            build_backbone(cfg.student), lambda data: _crops(data, batch), batch, steps, autocast)),
        **{name: lambda extra=extra: (stream(), *_dinoscale_step(_config(pool, batch, steps, out, peak_flops, extra),
                                                                  autocast))
           for name, extra in DINOSCALE_STEPS.items()},
    }
    return {name: builders[name]() for name in names}


def _timed_steps(steppers: dict[str, Stepper], steps: int, batch: int,
                 peak_flops: float) -> tuple[dict[str, dict], dict[str, list[tuple[float, float]]]]:
    """Every stepper once per iteration, in turn; per stepper its medians, and its (wall, CPU) seconds per timed step."""
    timings: dict[str, list[tuple[float, float, float]]] = {name: [] for name in steppers}
    for iteration in range(steps):
        for name, (batches, step, flops) in steppers.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            data = next(batches)
            step(iteration, data)
            timings[name].append((time.perf_counter() - start, time.process_time() - cpu_start, flops(data)))
    result, seconds = {}, {}
    for name, rows in timings.items():
        rows = rows[WARMUP_STEPS:]
        seconds[name] = [r[:2] for r in rows]
        result[name] = {"images_per_s": batch / statistics.median(r[0] for r in rows),
                        "images_per_cpu_s": batch / statistics.median(r[1] for r in rows),
                        "mfu": statistics.median(r[2] / r[0] / peak_flops for r in rows)}
    return result, seconds


def worker_interleaved(pool: str, batch: int, steps: int, out: str, peak_flops: float) -> dict:
    """The lightly peers and dinoscale's steps alternating in one process; each step's ratio to each peer."""
    from dinoscale.distributed import process_group

    with process_group():  # dinoscale's model is sharded over a world of one, as in the trainer
        steppers = _steppers(pool, batch, steps, out, peak_flops, (*LIGHTLY_PEERS, *DINOSCALE_STEPS))
        result, seconds = _timed_steps(steppers, steps, batch, peak_flops)
    for name in (*DINOSCALE_STEPS, LIGHTLY_PEERS[1]):
        for peer in LIGHTLY_PEERS:
            if name != peer:
                pairs = list(zip(seconds[name], seconds[peer]))
                suffix = "" if peer == LIGHTLY_PEERS[0] else "_on_dinoscale_backbone"
                result[name][f"vs_lightly{suffix}"] = statistics.median(b[0] / a[0] for a, b in pairs)
                result[name][f"cpu_vs_lightly{suffix}"] = statistics.median(b[1] / a[1] for a, b in pairs)
    return result


def worker_lightly(pool: str, batch: int, steps: int, out: str, peak_flops: float) -> dict:
    """The timm peer alone (its peak memory)."""
    steppers = _steppers(pool, batch, steps, out, peak_flops, LIGHTLY_PEERS[:1])
    return _timed_steps(steppers, steps, batch, peak_flops)[0][LIGHTLY_PEERS[0]]


def _gram_materialised(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The batch-level Gram loss as the DINOv3 reference computes it (and dinoscale did before): both
    (B*N)^2 similarity matrices materialised."""
    student = F.normalize(student.float(), dim=-1).flatten(0, 1)
    teacher = F.normalize(teacher.float(), dim=-1).flatten(0, 1)
    return F.mse_loss(student @ student.T, teacher @ teacher.T)


def worker_gram(variant: str, batch: int, repeats: int = 5) -> dict:
    """Forward + backward of the Gram loss on the student's global-crop patch tokens of `batch` images."""
    from dinoscale.losses import GramLoss

    loss_fn = {"image": GramLoss(img_level=True), "batch": GramLoss(img_level=False),
               "batch_materialised": _gram_materialised}[variant]
    student = torch.randn(2 * batch, (GLOBAL_SIZE // 16) ** 2, 384, requires_grad=True)
    teacher = torch.randn(2 * batch, (GLOBAL_SIZE // 16) ** 2, 384)
    rss_before = peak_rss_mib()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss_fn(student, teacher).backward()
        seconds.append(time.perf_counter() - start)
    return {"seconds": statistics.median(seconds), "extra_peak_rss_mb": peak_rss_mib() - rss_before}


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


def _gram_summary(batches: list[int]) -> dict:
    """Each Gram variant at each batch, in its own process (clean peak memory); ratios to the materialised one."""
    summary = {}
    for batch in batches:
        runs = {v: _run(["--worker", "gram", "--gram-variant", v, "--batch", str(batch)]) for v in GRAM_VARIANTS}
        baseline = runs["batch_materialised"]
        summary[f"batch_{batch}"] = {
            "similarity_rows": 2 * batch * (GLOBAL_SIZE // 16) ** 2,
            **{v: {**r, "speed_vs_batch_materialised": baseline["seconds"] / r["seconds"],
                   "memory_vs_batch_materialised": baseline["extra_peak_rss_mb"] / max(r["extra_peak_rss_mb"], 1.0)}
               for v, r in runs.items()}}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of runs")
    parser.add_argument("--peak-flops", type=float, help="bf16 matmul FLOP/s of one process (default: measured)")
    parser.add_argument("--worker", choices=["trainer", "interleaved", "lightly", "gram"])
    parser.add_argument("--pool")
    parser.add_argument("--out", help="run directory of a worker")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides of a trainer worker")
    parser.add_argument("--gram-variant", choices=GRAM_VARIANTS)
    args = parser.parse_args()

    if args.worker:
        if args.worker == "trainer":
            result = worker_trainer(args.pool, args.batch, args.steps, args.out, args.peak_flops, args.set)
        elif args.worker == "gram":
            result = worker_gram(args.gram_variant, args.batch)
        else:
            worker = worker_interleaved if args.worker == "interleaved" else worker_lightly
            result = worker(args.pool, args.batch, args.steps, args.out, args.peak_flops)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps({**result, "peak_rss_mb": peak_rss_mib()}))
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
    last_round_only = ("selective_ac", "full_ac", "compile", "lightly")  # compared with that round's full_1
    runs: dict[str, list[dict]] = {name: [] for name in ("interleaved", "lightly", *trainer_runs)}
    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic_pool(tmp, SyntheticSpec(n_images=200, image_size=160, eval_per_class=1))
        common = ["--pool", str(Path(tmp) / "pool"), "--steps", str(args.steps), "--peak-flops"]
        for index in range(args.repeats):
            last = index == args.repeats - 1
            runs["interleaved"].append(_run(["--worker", "interleaved", *common, str(peaks[threads]), "--batch",
                                             str(args.batch), "--out", str(Path(tmp) / f"interleaved_{index}")]))
            if last:
                runs["lightly"].append(_run(["--worker", "lightly", *common, str(peaks[threads]), "--batch",
                                             str(args.batch), "--out", str(Path(tmp) / "lightly")]))
            for name, (nproc, overrides) in trainer_runs.items():
                if name in last_round_only and not last:
                    continue
                peak = peaks[threads] if nproc == 1 else peaks[1]
                runs[name].append(_run(["--worker", "trainer", *common, str(peak), "--batch", str(args.batch // nproc),
                                        "--out", str(Path(tmp) / f"{name}_{index}"), "--set", *overrides],
                                       nproc=nproc))
        gram = _gram_summary([args.batch, 4 * args.batch])

    interleaved = {name: _medians([r[name] for r in runs["interleaved"]]) for name in (*LIGHTLY_PEERS, *DINOSCALE_STEPS)}
    full, last_full, lightly = _medians(runs["full_1"]), runs["full_1"][-1], runs["lightly"][0]
    print(json.dumps({
        "benchmark": "train_step",
        "machine": describe_machine(threads=threads),
        "setup": {"backbone": "vit_small/16", "global_crops": f"2x{GLOBAL_SIZE}", "local_crops": f"{N_LOCAL}x{LOCAL_SIZE}",
                  "global_batch": args.batch, "prototypes": PROTOTYPES, "precision": "bf16 autocast",
                  "data_workers": NUM_WORKERS, "steps": args.steps, "timed_steps": args.steps - WARMUP_STEPS,
                  "repeats": args.repeats},
        "peers": {
            "lightly_dino_only": "lightly's DINO recipe on timm vit_small_patch16_224 (dynamic_img_size) with lightly's "
                                 "DINOTransform and a DataLoader: the whole stack as a lightly user builds it",
            "lightly_dino_only_dinoscale_backbone": "the same lightly objective on dinoscale's ViT-S/16 and batch "
                                                    "stream: only the objective and optimiser differ",
            "full_objective": "dinoscale's trainer step: DINO + iBOT + KoLeo + Gram (image level), more work per image",
            "full_objective_batch_gram": "the same with one Gram matrix over the batch (gram.img_level=false)",
            "without_gram": "DINO + iBOT + KoLeo"},
        "matmul_peak_flops": {"one_process": peaks[threads], "per_rank_of_two": peaks[1],
                              "measured": not args.peak_flops},
        "one_process_interleaved_steps": interleaved,
        **{f"{cpu}ratio_{name}_vs_lightly{suffix}": interleaved[name][f"{cpu}vs_lightly{suffix}"]
           for name in ("full_objective", "without_gram") for cpu in ("", "cpu_")
           for suffix in ("", "_on_dinoscale_backbone")},
        # the lightly objective moved from timm's ViT and lightly's data pipeline to dinoscale's
        "ratio_lightly_on_dinoscale_backbone_vs_lightly": interleaved[LIGHTLY_PEERS[1]]["vs_lightly"],
        "cpu_ratio_lightly_on_dinoscale_backbone_vs_lightly": interleaved[LIGHTLY_PEERS[1]]["cpu_vs_lightly"],
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
        "lightly_dino_only_alone": {**lightly, "peak_rss_mb_vs_trainer": lightly["peak_rss_mb"] / last_full["peak_rss_mb"]},
        "gram_loss": gram,
        "compile": {"images_per_s": runs["compile"][0]["images_per_s"],
                    "speed_vs_eager": runs["compile"][0]["images_per_s"] / last_full["images_per_s"],
                    "cpu_speed_vs_eager": runs["compile"][0]["images_per_cpu_s"] / last_full["images_per_cpu_s"],
                    "first_step_s": runs["compile"][0]["first_step_s"], "eager_first_step_s": last_full["first_step_s"]},
    }, indent=2))


if __name__ == "__main__":
    main()
