"""Training-step throughput and MFU: dinoscale's full objective (DINO + iBOT + KoLeo, separate
heads, EMA teacher) on a ViT-S/16 with a CPU-sized crop set, 1 process vs 2 processes, peak
memory with and without activation checkpointing, against a DINO-only step built with the
lightly library on the same backbone (lightly's DINOProjectionHead, DINOLoss, update_momentum,
one forward per crop as its examples do).

Every configuration runs in its own subprocess (clean peak memory; torchrun for 2 ranks) on the
same synthetic images; the parent prints one JSON object.

    python -m benchmarks.bench_train [--steps 6] [--batch 16]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GLOBAL_SIZE, LOCAL_SIZE, N_LOCAL = 128, 64, 4
PROTOTYPES = 4096


def _config(pool: str, batch: int, steps: int, checkpointing: str, out: str):
    from dinoscale.config import load_config

    return load_config(None, [
        "student.arch=vit_small", "student.patch_size=16", f"student.img_size={GLOBAL_SIZE}",
        f"dino.head_n_prototypes={PROTOTYPES}", f"ibot.head_n_prototypes={PROTOTYPES}",
        f"crops.global_crops_size={GLOBAL_SIZE}", f"crops.local_crops_size={LOCAL_SIZE}",
        f"crops.local_crops_number={N_LOCAL}", f"train.batch_size_per_gpu={batch}", f"train.max_iterations={steps}",
        "train.num_workers=1", "train.mixed_precision=auto", f"train.activation_checkpointing={checkpointing}",
        f"train.dataset_path={pool}", f"train.output_dir={out}", "train.checkpoint_period_iterations=100000",
        "train.log_period_iterations=1000", "optim.warmup_epochs=0", "teacher.warmup_teacher_temp_epochs=0",
    ])


def worker_dinoscale(pool: str, batch: int, steps: int, checkpointing: str, out: str) -> dict:
    from dinoscale.eval.report import read_metrics
    from dinoscale.train.trainer import train

    train(_config(pool, batch, steps, checkpointing, out))
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    metrics = read_metrics(Path(out) / "metrics.jsonl")  # rank 0 writes it
    timed = metrics[2:]  # the first steps include warm-up and worker start
    return {"images_per_s": sum(m["images_per_s"] for m in timed) / len(timed),
            "mfu": sum(m["mfu"] for m in timed) / len(timed)}


def worker_lightly(pool: str, batch: int, steps: int) -> dict:
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import update_momentum

    from dinoscale.data.augment import MultiCropAugmentation
    from dinoscale.data.pool import open_pool
    from dinoscale.data.stream import BatchStream, Source, make_loader
    from dinoscale.utils.device import autocast_dtype
    from dinoscale.models import build_backbone
    from dinoscale.train.metrics import backbone_forward_flops, head_forward_flops, measure_matmul_peak

    cfg = _config(pool, batch, steps, "none", "unused")
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
    peak = measure_matmul_peak(device, dtype, seconds=0.5)
    tokens_g, tokens_l = (GLOBAL_SIZE // 16) ** 2 + 1, (LOCAL_SIZE // 16) ** 2 + 1
    flops = 3 * (backbone_forward_flops(student_backbone, 2 * batch, tokens_g)
                 + backbone_forward_flops(student_backbone, N_LOCAL * batch, tokens_l)
                 + head_forward_flops(student_head, (2 + N_LOCAL) * batch)) \
        + backbone_forward_flops(student_backbone, 2 * batch, tokens_g) + head_forward_flops(student_head, 2 * batch)
    times = []
    for _ in range(steps):
        views = next(loader)["views"]
        start = time.perf_counter()
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
    seconds = sum(times[2:]) / len(times[2:])
    return {"images_per_s": batch / seconds, "mfu": flops / seconds / peak}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run(args: list[str], nproc: int = 1) -> dict:
    command = [sys.executable, "-m", "benchmarks.bench_train", *args]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "benchmarks.bench_train", *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return results[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--worker", choices=["dinoscale", "lightly"])
    parser.add_argument("--pool")
    parser.add_argument("--checkpointing", default="none")
    parser.add_argument("--out", help="run directory of a worker")
    args = parser.parse_args()

    if args.worker:
        if args.worker == "dinoscale":
            result = worker_dinoscale(args.pool, args.batch, args.steps, args.checkpointing, args.out)
        else:
            result = worker_lightly(args.pool, args.batch, args.steps)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps({**result, "peak_rss_mb": _peak_rss_mb()}))
        return

    from dinoscale.data.synthetic import SyntheticSpec, make_synthetic_pool

    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic_pool(tmp, SyntheticSpec(n_images=200, image_size=160, eval_per_class=1))
        pool = str(Path(tmp) / "pool")
        common = ["--pool", pool, "--steps", str(args.steps)]
        lightly = _run(["--worker", "lightly", "--batch", str(args.batch), *common])
        runs = {}
        for name, batch, nproc, checkpointing in (("one", args.batch, 1, "none"), ("two", args.batch // 2, 2, "none"),
                                                  ("full", args.batch, 1, "full"),
                                                  ("selective", args.batch, 1, "selective")):
            runs[name] = _run(["--worker", "dinoscale", "--batch", str(batch), "--checkpointing", checkpointing,
                               "--out", str(Path(tmp) / name), *common], nproc=nproc)
        one, two, full_ac, selective_ac = runs["one"], runs["two"], runs["full"], runs["selective"]
    print(json.dumps({
        "benchmark": "train_step",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "setup": {"backbone": "vit_small/16", "global_crops": f"2x{GLOBAL_SIZE}", "local_crops": f"{N_LOCAL}x{LOCAL_SIZE}",
                  "global_batch": args.batch, "prototypes": PROTOTYPES, "steps": args.steps},
        "lightly_dino_only": lightly,
        "dinoscale_full_objective_1_process": one,
        "dinoscale_full_objective_2_processes": two,
        "activation_checkpointing": {"none_peak_rss_mb": one["peak_rss_mb"], "full": full_ac, "selective": selective_ac},
        "ratio_images_per_s_vs_lightly": one["images_per_s"] / lightly["images_per_s"],
        "ratio_2_vs_1_process": two["images_per_s"] / one["images_per_s"],
    }, indent=2))


if __name__ == "__main__":
    main()
