"""The bodies of `dinoscale eval knn|linear|dense|visualize|report` (argument parsing is in `cli`).

Each command writes `report.json`, `report.md` (with its PNGs) and a self-contained
`report.html` into --out; only rank 0 writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dinoscale.config import load_config
from dinoscale.data.pool import open_pool
from dinoscale.distributed import rank
from dinoscale.errors import DataError
from dinoscale.eval.cli import METRICS_FILE
from dinoscale.eval.dense import DenseResult, evaluate_dense_backbone
from dinoscale.eval.dense_data import open_dense_datasets
from dinoscale.eval.evaluate import (ALL_VAL, evaluate_knn_subsets, evaluate_linear, knn_over_checkpoints,
                                     open_labelled, read_key_subset)
from dinoscale.eval.report import knn_history, plot_knn_curve, plot_loss_curves, read_metrics
from dinoscale.eval.resolution import EvalResolution, eval_resolution
from dinoscale.eval.visualize import render_dense_pictures, render_pictures, tile_size
from dinoscale.models.loading import load_backbone
from dinoscale.utils.report import Section, write_report


def _config(args: argparse.Namespace, weights: str | None = None) -> tuple[DictConfig, EvalResolution]:
    """The config of the command, its eval.image_size set to the resolution `weights` are evaluated at."""
    cfg = load_config(args.config, args.overrides)
    if getattr(args, "train", None):
        cfg.eval.train_dataset = args.train
    if getattr(args, "val", None):
        cfg.eval.val_dataset = args.val
    resolution = eval_resolution(cfg.eval, weights)
    cfg.eval.image_size = resolution.image_size
    return cfg, resolution


def _setup(args: argparse.Namespace, cfg: DictConfig, resolution: EvalResolution | None) -> dict[str, Any]:
    setup = {"weights": getattr(args, "weights", None), "arch": args.arch,
             "eval": OmegaConf.to_container(cfg.eval, resolve=True)}
    return setup if resolution is None else {**setup, "resolution": resolution.as_dict()}


def _datasets_line(cfg: DictConfig, train: Any, val: Any) -> str:
    return (f"train: {cfg.eval.train_dataset} ({len(train)} images, {len(train.class_names)} classes); "
            f"val: {cfg.eval.val_dataset} ({len(val)} images)")


def _finish(out: str, title: str, sections: list[Section], results: dict, summary: str) -> None:
    if rank() == 0:
        paths = write_report(out, title, sections, results)
        print(f"{summary}; report: {paths['html']}")


def _val_subsets(args: argparse.Namespace, val: Any) -> dict[str, set[str]]:
    """The named subsets of the val keys that --val-subset / --val-exclude select."""
    subsets = {}
    if args.val_subset:
        subsets[f"in {Path(args.val_subset).name}"] = read_key_subset(args.val_subset, val)
    if args.val_exclude:
        subsets[f"not in {Path(args.val_exclude).name}"] = set(val.keys) - read_key_subset(args.val_exclude, val)
    return subsets


def cmd_knn(args: argparse.Namespace) -> None:
    cfg, resolution = _config(args, args.weights)
    train, val = open_labelled(cfg.eval.train_dataset, "train"), open_labelled(cfg.eval.val_dataset, "val")
    results = evaluate_knn_subsets(load_backbone(args.weights, args.arch), train, val, cfg.eval,
                                   _val_subsets(args, val))
    header, rows = ["k"], [[str(k)] for k in results[ALL_VAL].top1]
    for name, result in results.items():
        label = "" if name == ALL_VAL else f", val {name} ({result.n_queries} images)"
        header += [f"top-1 (%){label}", f"top-5 (%){label}"]
        for row, k in zip(rows, result.top1):
            row += [f"{result.top1[k]:.2f}", f"{result.top5[k]:.2f}"]
    text = (f"Weights {args.weights}; {cfg.eval.knn_features} features at {resolution.describe()}; weighted vote "
            f"exp(sim/T) with T={cfg.eval.knn_temperature}. {_datasets_line(cfg, train, val)}.")
    summary = f"k-NN top-1 at {resolution.image_size} px ({cfg.eval.resize}): " + "; ".join(
        ("" if name == ALL_VAL else f"val {name}: ") + ", ".join(f"{k}-NN {v:.2f}%" for k, v in r.top1.items())
        for name, r in results.items())
    knn = {**results[ALL_VAL].as_dict(), "subsets": {n: r.as_dict() for n, r in results.items() if n != ALL_VAL}}
    _finish(args.out, "k-NN evaluation", [Section("Weighted k-NN", text, [header, *rows])],
            {**_setup(args, cfg, resolution), "knn": knn}, summary)


def cmd_linear(args: argparse.Namespace) -> None:
    cfg, resolution = _config(args, args.weights)
    train, val = open_labelled(cfg.eval.train_dataset, "train"), open_labelled(cfg.eval.val_dataset, "val")
    result = evaluate_linear(load_backbone(args.weights, args.arch), train, val, cfg.eval, seed=cfg.seed)
    grid = [["lr", "weight decay", "selection top-1 (%)"]] + [
        [f"{p['lr']:g}", f"{p['weight_decay']:g}", f"{p['val_top1']:.2f}"] for p in result.grid]
    text = (f"Weights {args.weights}; {cfg.eval.linear_features} features at {resolution.describe()}. "
            f"Grid point chosen on {result.n_val} held-out training images, retrained on all {result.n_train}, "
            f"scored on {result.n_test} val images: top-1 {result.test_top1:.2f}%, top-5 {result.test_top5:.2f}% "
            f"(lr {result.lr:g}, weight decay {result.weight_decay:g}). {_datasets_line(cfg, train, val)}.")
    summary = (f"linear probe top-1 {result.test_top1:.2f}% at {resolution.image_size} px (lr {result.lr:g}, "
               f"wd {result.weight_decay:g})")
    _finish(args.out, "Linear probe", [Section("Linear probe", text, grid)],
            {**_setup(args, cfg, resolution), "linear": result.as_dict()}, summary)


def dense_sections(result: DenseResult, cfg: DictConfig, what: str) -> list[Section]:
    """Report sections of a dense evaluation of `what` (the weights, or a model's name): scores, grids, pictures."""
    dense = cfg.eval.dense
    sections = []
    for name, probe in (("segmentation", result.segmentation), ("depth", result.depth)):
        if probe is None:
            continue
        scores = probe.scores
        if name == "segmentation":
            table = [["mIoU (%)", "pixel accuracy (%)", "mean class accuracy (%)", "classes"],
                     [f"{scores['miou']:.2f}", f"{scores['pixel_accuracy']:.2f}", f"{scores['mean_accuracy']:.2f}",
                      str(result.n_classes)]]
            title = "Linear segmentation"
        else:
            table = [["RMSE", "δ1 (%)", "AbsRel"],
                     [f"{scores['rmse']:.3f}", f"{scores['delta1']:.2f}", f"{scores['abs_rel']:.3f}"]]
            title = "Linear depth"
        held_out = next(k for k in probe.grid[0] if k.startswith("val_"))
        grid = ", ".join(f"lr {p['lr']:g} wd {p['weight_decay']:g}: {p[held_out]:.3g}" for p in probe.grid)
        text = (f"{what}; patch tokens ({dense.backbone_out_layers}{', with CLS' if dense.use_cls_token else ''}) "
                f"at {dense.image_size} px, a linear layer per patch, outputs upsampled bilinearly to each label map. "
                f"Grid point chosen on {probe.n_val} held-out train images (their "
                f"{'mIoU' if name == 'segmentation' else 'RMSE'} per point: {grid}), retrained on "
                f"all {probe.n_train}, scored on {probe.n_test} val images "
                f"(lr {probe.lr:g}, weight decay {probe.weight_decay:g}).")
        sections.append(Section(title, text, table))
    skipped = {role: counts for role, counts in result.skipped.items() if counts}
    if skipped:
        sections.append(Section("Images left out", "; ".join(
            f"{role}: " + ", ".join(f"{n} x {kind}" for kind, n in counts.items()) for role, counts in skipped.items())))
    if result.pictures:
        png = render_dense_pictures(result.pictures, dense.ignore_index, dense.min_depth, dense.max_depth,
                                    tile_size(dense.image_size))
        sections.append(Section("Dense predictions", "Val images with their true and predicted masks (one colour "
                                "per class, white: ignored) and depth (near: dark; scale of the true depth).",
                                images={"dense predictions": png}))
    return sections


def cmd_dense(args: argparse.Namespace) -> None:
    cfg, _ = _config(args)  # the dense probes resize to eval.dense.image_size
    for role in ("train", "val"):
        for option, key in (("", "dataset"), ("_masks", "masks"), ("_depth", "depth")):
            value = getattr(args, f"{role}{option}", None)
            if value:
                cfg.eval.dense[f"{role}_{key}"] = value
    train, val = open_dense_datasets(cfg.eval.dense)
    result = evaluate_dense_backbone(load_backbone(args.weights, args.arch), train, val, cfg.eval, seed=cfg.seed,
                                     n_pictures=cfg.eval.dense.n_pictures)
    summary = ", ".join(f"{k} {v:.3g}" for k, v in result.metrics().items())
    _finish(args.out, "Dense evaluation", dense_sections(result, cfg, f"Weights {args.weights}"),
            {**_setup(args, cfg, None), "dense": result.as_dict()}, summary)


def cmd_visualize(args: argparse.Namespace) -> None:
    cfg, resolution = _config(args, args.weights)
    source = args.images or cfg.eval.val_dataset
    if not source:
        raise DataError("no images to draw; pass --images DIR (or set eval.val_dataset)")
    pictures = render_pictures(load_backbone(args.weights, args.arch), open_pool(source),
                               image_size=cfg.eval.image_size, n_images=cfg.eval.visualize_n_images,
                               foreground_threshold=cfg.eval.pca_foreground_threshold, precision=cfg.eval.precision,
                               resize=cfg.eval.resize)
    sections = [
        Section("PCA of patch features", f"Images at {resolution.describe()}. Columns: image; first three principal "
                "components of all patches as RGB; foreground (first component above the threshold); PCA of the "
                "foreground patches only.", images={"pca": pictures["pca"]}),
        Section("CLS attention of the last block", "Columns: image; mean over heads; one map per head.",
                images={"attention": pictures["attention"]}),
    ]
    _finish(args.out, f"Pictures of {Path(args.weights).name}", sections,
            {**_setup(args, cfg, resolution), "images": str(source)}, f"pictures of {source}")


def cmd_report(args: argparse.Namespace) -> None:
    cfg, resolution = _config(args, args.checkpoints[0] if args.checkpoints else None)
    metrics = args.metrics or (str(Path(args.run) / METRICS_FILE) if args.run else None)
    if not metrics and not args.checkpoints:
        raise DataError("nothing to report; pass --run DIR (or --metrics FILE) and/or --checkpoints PATH ...")
    sections, results = [], _setup(args, cfg, resolution if args.checkpoints else None)
    history: list[dict] = []
    if metrics:
        records = read_metrics(metrics)
        sections.append(Section("Training losses", f"{len(records)} metric records from {metrics}.",
                                images={"losses": plot_loss_curves(records)}))
        history = knn_history(records)
        results["metrics"] = metrics
    if args.checkpoints:
        train, val = open_labelled(cfg.eval.train_dataset, "train"), open_labelled(cfg.eval.val_dataset, "val")
        history = knn_over_checkpoints(args.checkpoints, train, val, cfg.eval,
                                       load=lambda path: load_backbone(path, args.arch))
    if history:
        ks = sorted({k for p in history for k in p["top1"]})
        table = [["iteration", *[f"{k}-NN top-1 (%)" for k in ks]]] + [
            [str(p["iteration"]), *[f"{p['top1'][k]:.2f}" if k in p["top1"] else "" for k in ks]] for p in history]
        text = f"Checkpoints evaluated at {resolution.describe()}." if args.checkpoints else ""
        sections.append(Section("k-NN accuracy over training", text, table, images={"knn": plot_knn_curve(history)}))
        results["knn_history"] = history
    _finish(args.out, "Training report", sections, results, f"report of {len(sections)} sections")
