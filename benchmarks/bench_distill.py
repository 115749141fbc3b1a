"""Distillation against training from scratch, on the synthetic pool.

A teacher is trained with `train/small_pool` (a 48-wide, 3-block ViT/8 on 32-px crops), then a
smaller student (32 wide, 2 blocks) is trained for the same number of steps twice: distilled from
that frozen teacher with `dinoscale distill` (DINO + iBOT + KoLeo against its Sinkhorn-Knopp
targets), and with SSL from scratch (`train/small_pool` with the student's architecture). All four
models (teacher, distilled student, student from scratch, student at random init) are scored by the
weighted k-NN (k=20) of their CLS token on the pool's held-out split. Everything runs in this
process, one rank; the run folders are kept under --out.

    python -m benchmarks.bench_distill [--teacher-iterations 1000] [--student-iterations 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from dinoscale.config import load_config
from dinoscale.data.synthetic import SyntheticSpec, make_synthetic_pool
from dinoscale.distill.job import distill
from dinoscale.eval.evaluate import evaluate_knn, open_labelled
from dinoscale.eval.resolution import at_training_resolution
from dinoscale.models import build_backbone, load_backbone
from dinoscale.train.trainer import train
from dinoscale.utils.machine import describe_machine

PRESET = "train/small_pool"
STUDENT = ["student.embed_dim=32", "student.depth=2", "student.num_heads=2"]


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(root: Path, teacher_iterations: int, student_iterations: int, pool_images: int) -> dict:
    data = root / "data"
    if not (data / "eval_test").exists():
        make_synthetic_pool(data, SyntheticSpec(n_images=pool_images, image_size=64))
    common = [f"train.dataset_path={data / 'pool'}", "train.log_period_iterations=100"]
    teacher_cfg = load_config(PRESET, [*common, f"train.output_dir={root / 'teacher'}",
                                       f"train.iterations={teacher_iterations}"])
    teacher_export, teacher_seconds = _timed(lambda: train(teacher_cfg))

    scratch_cfg = load_config(PRESET, [*common, *STUDENT, f"train.output_dir={root / 'scratch'}",
                                       f"train.iterations={student_iterations}"])
    scratch_export, scratch_seconds = _timed(lambda: train(scratch_cfg))

    distill_file = root / "distill.yaml"
    distill_file.write_text(yaml.safe_dump({"defaults": [PRESET], "distill": {
        "teacher": str(root / "teacher"), "global_batch_size": teacher_cfg.train.batch_size_per_gpu,
        "students": [{"name": "student", "ranks_range": [0, 1], "overrides": STUDENT}]}}))
    distill_cfg = load_config(str(distill_file), [*common, f"train.output_dir={root / 'distilled'}",
                                                  f"train.iterations={student_iterations}"])
    exports, distill_seconds = _timed(lambda: distill(distill_cfg))

    eval_cfg = at_training_resolution(teacher_cfg.eval, teacher_cfg.crops)
    train_images, test_images = open_labelled(data / "eval_train", "train"), open_labelled(data / "eval_test", "val")
    torch.manual_seed(0)
    models = {"teacher": load_backbone(teacher_export), "distilled_student": load_backbone(exports["student"]),
              "scratch_student": load_backbone(scratch_export), "random_init_student": build_backbone(scratch_cfg.student)}
    knn = {}
    for name, model in models.items():
        knn[name] = evaluate_knn(model.eval(), train_images, test_images, eval_cfg).top1[20]
    gap_distilled, gap_scratch = knn["teacher"] - knn["distilled_student"], knn["teacher"] - knn["scratch_student"]
    return {
        "pool_images": pool_images, "teacher_iterations": teacher_iterations, "student_iterations": student_iterations,
        "batch": teacher_cfg.train.batch_size_per_gpu, "knn_top1_k20": knn,
        "params": {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()},
        "gap_to_teacher_distilled_points": gap_distilled, "gap_to_teacher_scratch_points": gap_scratch,
        "distilled_closer_to_teacher": abs(gap_distilled) < abs(gap_scratch),
        "seconds": {"teacher_training": teacher_seconds, "scratch_training": scratch_seconds,
                    "distillation": distill_seconds},
        "distill_vs_scratch_step_time": distill_seconds / scratch_seconds,
        "machine": describe_machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-iterations", type=int, default=1000)
    parser.add_argument("--student-iterations", type=int, default=300)
    parser.add_argument("--pool-images", type=int, default=3000)
    parser.add_argument("--out", type=Path, help="folder of the runs (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        print(json.dumps(run(root, args.teacher_iterations, args.student_iterations, args.pool_images), indent=2))


if __name__ == "__main__":
    main()
