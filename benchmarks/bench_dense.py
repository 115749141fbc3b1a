"""Dense probes on the synthetic pool: the demo's trained teacher against the same ViT at random
init and against raw-pixel patches (segmentation mIoU, depth RMSE), and Gram anchoring measured
where it acts: the demo's final training round with and without Gram anchoring in its last part,
same length, over several seeds, compared on dense mIoU / depth RMSE and on k-NN.

    python -m benchmarks.bench_dense [--quick] [--work-dir DIR] [--gram-seeds 0 1]

The demo runs first in --work-dir (default runs/bench_dense, runs/bench_dense_quick with --quick;
a re-run skips its finished stages and runs and only re-evaluates); the Gram runs continue from
the demo's embedder on its curated shards, exactly as the demo's final round, changing only the
seed and gram.use_loss. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from dinoscale.config import load_config
from dinoscale.demo.run import QUICK_OVERRIDES, dense_datasets, final_overrides, run_demo, train_stage
from dinoscale.eval.dense import evaluate_dense_backbone
from dinoscale.eval.evaluate import evaluate_knn, open_labelled
from dinoscale.models import load_backbone
from dinoscale.utils.machine import describe_machine
from dinoscale.train.export import EXPORT_NAME
from dinoscale.utils.logging import get_logger

log = get_logger("benchmarks.bench_dense")


def gram_run(cfg, demo_dir: Path, seed: int, gram: bool) -> dict:
    """The demo's final round with `seed`, with or without Gram anchoring; its teacher's k-NN and dense scores."""
    run_cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"seed={seed}"]))
    overrides = final_overrides(run_cfg, demo_dir / "embedder" / EXPORT_NAME)
    if not gram:
        overrides.append("gram.use_loss=false")
    # the demo's own final round is the run with Gram anchoring at the demo's seed
    run_dir = demo_dir / "train" if gram and seed == cfg.seed else \
        demo_dir / "gram_runs" / f"seed{seed}_{'gram' if gram else 'no_gram'}"
    teacher = train_stage(run_cfg, run_dir, demo_dir / "curate" / "shards", overrides)
    synthetic = demo_dir / "synthetic"
    model = load_backbone(teacher).eval()
    knn = evaluate_knn(model, open_labelled(synthetic / "eval_train", "train"),
                       open_labelled(synthetic / "eval_test", "val"), cfg.eval)
    dense = evaluate_dense_backbone(model, *dense_datasets(synthetic, cfg), cfg.eval, seed=cfg.seed)
    return {"seed": seed, "gram": gram, "knn_top1": knn.top1, **dense.metrics()}


def _mean_spread(runs: list[dict], key: str) -> dict:
    values = [r[key] for r in runs]
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values), "values": values}


def compare_gram(runs: list[dict], knn_k: int) -> dict:
    """Means and ranges over seeds with and without Gram anchoring, and the differences per seed."""
    for r in runs:
        r[f"knn_top1_k{knn_k}"] = r["knn_top1"][knn_k]
    keys = ["segmentation_miou", "segmentation_pixel_accuracy", "depth_rmse", "depth_delta1", f"knn_top1_k{knn_k}"]
    out = {}
    for gram in (True, False):
        chosen = [r for r in runs if r["gram"] == gram]
        out["with_gram" if gram else "without_gram"] = {k: _mean_spread(chosen, k) for k in keys}
    by_seed = {(r["seed"], r["gram"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    out["difference_with_minus_without"] = {
        k: [by_seed[(s, True)][k] - by_seed[(s, False)][k] for s in seeds] for k in keys}
    out["seeds"] = seeds
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick demo profile (a smoke test)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="demo and Gram runs, kept: a re-run skips what finished (default: runs/bench_dense)")
    parser.add_argument("--gram-seeds", type=int, nargs="*", default=[0, 1],
                        help="seeds of the with/without Gram comparison (none: skip it)")
    args = parser.parse_args()
    demo_dir = args.work_dir or Path("runs/bench_dense_quick" if args.quick else "runs/bench_dense")
    summary = run_demo(demo_dir, quick=args.quick)
    cfg = load_config("demo", QUICK_OVERRIDES if args.quick else [])
    runs = []
    for seed in args.gram_seeds:
        for gram in (True, False):
            runs.append(gram_run(cfg, demo_dir, seed, gram))
            log.info("gram comparison run: %s", runs[-1])
    knn_k = 20 if 20 in cfg.eval.knn_k else cfg.eval.knn_k[0]
    report = {
        "machine": describe_machine(), "profile": "quick" if args.quick else "default",
        "demo_seconds": summary["seconds"],  # this call's: less when the work dir held finished stages
        "representations": summary["evaluation"],
        "dense_settings": OmegaConf.to_container(cfg.eval.dense),
        "gram_iterations": f"last {cfg.demo.gram_fraction:.0%} of {summary['training']['iterations']}",
        "gram_runs": runs, "gram_comparison": compare_gram(runs, knn_k) if runs else None, "knn_k": knn_k,
    }
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
