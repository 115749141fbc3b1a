"""`dinoscale demo`: the whole pipeline on the embedded synthetic pool, on a laptop CPU.

    synthetic pool -> embedder (a short first training round on the raw pool, as DINOv2 embedded
    its pool with a model it had trained) -> curation (embed, dedup, hierarchical k-means,
    balanced sampling, shards) -> training on the curated shards (DINO, iBOT, KoLeo, and Gram
    anchoring for the last part) -> evaluation against random init and raw pixels (k-NN, linear
    probe, and the dense probes: linear segmentation and depth on patch features) -> report.html

Every stage writes into its own folder under the output directory and is skipped on a re-run
once its marker matches its configuration; the trainer resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from dinoscale.config import load_config
from dinoscale.curation.dedup import load_dedup_result
from dinoscale.curation.dedup_eval import SOURCE, GroundTruth, score_groups
from dinoscale.curation.pipeline import run_curation, stage_dir
from dinoscale.curation.report import CLUSTER_SIZES_PNG, thumbnail_row
from dinoscale.data.pool import open_pool
from dinoscale.data.synthetic import CLASS_NAMES, SyntheticSpec, make_synthetic_pool
from dinoscale.eval.dense import evaluate_dense, evaluate_dense_backbone
from dinoscale.eval.dense_data import DenseDataset
from dinoscale.eval.evaluate import evaluate_knn, evaluate_linear, open_labelled
from dinoscale.eval.knn import knn_classify
from dinoscale.eval.linear import linear_probe
from dinoscale.eval.patch_features import PixelPatches
from dinoscale.eval.report import plot_loss_curves, read_metrics
from dinoscale.eval.visualize import render_dense_pictures, render_pictures, tile_size
from dinoscale.models import build_backbone, load_backbone
from dinoscale.train.export import EXPORT_NAME
from dinoscale.train.trainer import total_iterations, train
from dinoscale.utils.io import write_bytes, write_json
from dinoscale.utils.logging import get_logger
from dinoscale.utils.report import Section, figure_png, write_report
from dinoscale.utils.stages import is_done, mark_done, read_marker

log = get_logger(__name__)

# a few minutes on 2 cores: a small pool, two rounds of 300 iterations of 64 images
QUICK_OVERRIDES = [
    "demo.pool_images=500", "demo.image_size=32", "demo.eval_per_class=20", "demo.embedder_epochs=6",
    "demo.pictures=3", "train.OFFICIAL_EPOCH_LENGTH=50", "optim.epochs=6", "train.num_workers=1",
    "curation.sampling.target_size=300", "curation.kmeans.n_clusters=[30,8]", "curation.kmeans.sample_size=[3,2]",
    "curation.shards.shard_size=100", "eval.linear_epochs=30", "eval.dense.image_size=32",
]


def synthetic_spec(cfg: DictConfig) -> SyntheticSpec:
    return SyntheticSpec(n_images=cfg.demo.pool_images, image_size=cfg.demo.image_size,
                         eval_per_class=cfg.demo.eval_per_class, n_corrupt=max(3, cfg.demo.pool_images // 500),
                         seed=cfg.seed)


def pool_stage(out: Path, spec: SyntheticSpec) -> Path:
    directory = out / "synthetic"
    key = {**asdict(spec), "dense_ground_truth": True}  # pools written before it had masks and depth are redone
    if not is_done(directory, key):
        start = time.perf_counter()
        summary = make_synthetic_pool(directory, spec)
        mark_done(directory, key, {"n_items": summary["n_items"]}, time.perf_counter() - start)
        log.info("synthetic pool: %d images written", summary["n_items"])
    return directory


def train_stage(cfg: DictConfig, run_dir: Path, dataset: Path, overrides: Sequence[str]) -> Path:
    """Train (resuming if interrupted) unless the run's export exists for this config."""
    run_cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"train.dataset_path={dataset}",
                                                           f"train.output_dir={run_dir}", *overrides]))
    export = run_dir / EXPORT_NAME
    if is_done(run_dir, run_cfg) and export.exists():
        log.info("%s: already trained, skipping", run_dir.name)
        return export
    start = time.perf_counter()
    train(run_cfg)
    mark_done(run_dir, run_cfg, {"iterations": len(read_metrics(run_dir / "metrics.jsonl"))},
              time.perf_counter() - start)
    return export


def embedder_overrides(cfg: DictConfig) -> list[str]:
    return [f"optim.epochs={cfg.demo.embedder_epochs}", "gram.use_loss=false"]


def final_overrides(cfg: DictConfig, embedder: Path) -> list[str]:
    """Gram anchoring for the last `demo.gram_fraction` of the run, its teacher taken at that point;
    the backbone continues from the embedder's unless `demo.continue_from_embedder` is false."""
    iterations = total_iterations(cfg)
    first = int(iterations * (1 - cfg.demo.gram_fraction))
    overrides = ["gram.use_loss=true", f"gram.it_first_update={first}", f"gram.update_frequency={max(iterations, 1)}"]
    if cfg.demo.continue_from_embedder:
        overrides.append(f"student.pretrained_weights={embedder}")
    return overrides


def normalised_entropy(counts: Sequence[int]) -> float:
    p = np.asarray(counts, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum() / math.log(len(counts))) if len(counts) > 1 else 1.0


def duplicate_scores(dedup_dir: Path, synthetic_dir: Path, pool_keys: list[str]) -> dict[str, float]:
    """Pairwise precision and recall of the found duplicate groups against the planted copies."""
    picture, origin = np.array(pool_keys), np.full(len(pool_keys), SOURCE, dtype=object)
    source, position = np.arange(len(pool_keys)), {key: i for i, key in enumerate(pool_keys)}
    for group in json.loads((synthetic_dir / "duplicates.json").read_text()):
        for copy in group["copies"]:
            i = position[copy["key"]]
            picture[i], origin[i], source[i] = group["source"], copy["kind"], position[group["source"]]
    groups = load_dedup_result(dedup_dir).groups
    scores = score_groups(groups, GroundTruth(picture, origin, source))
    return {"precision": scores["precision"], "recall": scores["recall"], "true_pairs": scores["true_pairs"],
            "found_pairs": scores["found_pairs"], "groups_found": len(groups), "mixed_groups": scores["mixed_groups"]}


def class_histograms(synthetic_dir: Path, pool_keys: list[str], selected: np.ndarray) -> dict[str, list[int]]:
    """Class counts (from the labels hidden from curation) of the raw pool and the curated set."""
    labels = json.loads((synthetic_dir / "pool_labels.json").read_text())
    n_classes = len(json.loads((synthetic_dir / "synthetic.json").read_text())["class_names"])
    raw = np.bincount([v for v in labels.values() if v >= 0], minlength=n_classes)
    curated = np.bincount([labels[pool_keys[int(i)]] for i in selected if labels[pool_keys[int(i)]] >= 0],
                          minlength=n_classes)
    return {"raw": raw.tolist(), "curated": curated.tolist()}


def cluster_class_purity(synthetic_dir: Path, pool_keys: list[str], selected: np.ndarray,
                         cluster_path: np.ndarray) -> list[float]:
    """Per k-means level (finest first), the share of curated images whose cluster's most frequent
    hidden class is their own: balanced sampling equalises clusters, so it equalises classes only
    as far as the clusters follow them."""
    labels = json.loads((synthetic_dir / "pool_labels.json").read_text())
    y = np.array([labels[pool_keys[int(i)]] for i in selected])
    labelled = y >= 0
    purity = []
    for clusters in cluster_path[labelled].T:
        _, cluster_of = np.unique(clusters, return_inverse=True)
        counts = np.zeros((cluster_of.max() + 1, y.max() + 1), dtype=np.int64)
        np.add.at(counts, (cluster_of, y[labelled]), 1)
        purity.append(float(counts.max(axis=1).sum() / labelled.sum()))
    return purity


def pixel_features(images) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw pixels (downsampled to 16x16) as the weakest baseline representation."""
    rows, labels = [], []
    for i in range(len(images)):
        image = images.load(i)
        if image is not None:
            rows.append(np.asarray(image.resize((16, 16)), dtype=np.float32).ravel() / 255.0)
            labels.append(images.labels[i])
    x = torch.from_numpy(np.stack(rows))
    return x - x.mean(0), torch.tensor(labels)


def dense_datasets(synthetic_dir: Path, cfg: DictConfig) -> tuple[DenseDataset, DenseDataset]:
    """The labelled splits with their masks and depth maps, as the dense probes read them."""
    dense = cfg.eval.dense
    return tuple(DenseDataset(synthetic_dir / split, synthetic_dir / f"{split}_segmentation",
                              synthetic_dir / f"{split}_depth", role, dense.ignore_index, dense.reduce_zero_label,
                              dense.depth_normalization_constant)
                 for split, role in (("eval_train", "train"), ("eval_test", "val")))


DENSE_PICTURES = "dense_predictions.png"


def evaluation_stage(cfg: DictConfig, out: Path, teacher: Path, synthetic_dir: Path) -> dict[str, dict]:
    """k-NN, linear probe and dense probes of the teacher, the same ViT at random init and raw pixels;
    the teacher's dense predictions are drawn into eval/dense_predictions.png."""
    directory = out / "eval"
    key = {"teacher": str(teacher), "mtime": teacher.stat().st_mtime, "eval": OmegaConf.to_container(cfg.eval)}
    if is_done(directory, key):
        return read_marker(directory)["counts"]
    start = time.perf_counter()
    train_images = open_labelled(synthetic_dir / "eval_train", "train")
    test_images = open_labelled(synthetic_dir / "eval_test", "val")
    dense_train, dense_test = dense_datasets(synthetic_dir, cfg)
    torch.manual_seed(cfg.seed)
    models = {"trained teacher": load_backbone(teacher), "random init": build_backbone(cfg.student)}
    results: dict[str, dict] = {}
    for name, model in models.items():
        model.eval()
        knn = evaluate_knn(model, train_images, test_images, cfg.eval)
        linear = evaluate_linear(model, train_images, test_images, cfg.eval)
        n_pictures = cfg.demo.pictures if name == "trained teacher" else 0
        dense = evaluate_dense_backbone(model, dense_train, dense_test, cfg.eval, seed=cfg.seed, n_pictures=n_pictures)
        if dense.pictures:
            write_bytes(directory / DENSE_PICTURES, render_dense_pictures(
                dense.pictures, cfg.eval.dense.ignore_index, cfg.eval.dense.min_depth, cfg.eval.dense.max_depth,
                tile_size(cfg.eval.dense.image_size)))
        results[name] = {"knn_top1": {str(k): v for k, v in knn.top1.items()}, "linear_top1": linear.test_top1,
                         **dense.metrics()}
    train_x, train_y = pixel_features(train_images)
    test_x, test_y = pixel_features(test_images)
    knn = knn_classify(train_x, train_y, test_x, test_y, ks=list(cfg.eval.knn_k), temperature=cfg.eval.knn_temperature)
    linear = linear_probe(train_x, train_y, test_x, test_y, list(cfg.eval.linear_lrs), list(cfg.eval.linear_weight_decays),
                          cfg.eval.linear_epochs, cfg.eval.linear_batch_size)
    dense = evaluate_dense(PixelPatches(cfg.student.patch_size), dense_train, dense_test, cfg.eval, seed=cfg.seed)
    results["raw pixels"] = {"knn_top1": {str(k): v for k, v in knn.top1.items()}, "linear_top1": linear.test_top1,
                             **dense.metrics()}
    mark_done(directory, key, results, time.perf_counter() - start)
    return results


def run_demo(out: str | Path, quick: bool = False, overrides: Sequence[str] = ()) -> dict:
    out = Path(out)
    cfg = load_config("demo", [*(QUICK_OVERRIDES if quick else []), *overrides])
    started = time.perf_counter()

    synthetic_dir = pool_stage(out, synthetic_spec(cfg))
    pool_dir = synthetic_dir / "pool"
    log.info("stage 1/5 done: synthetic pool in %s", pool_dir)

    embedder = train_stage(cfg, out / "embedder", pool_dir, embedder_overrides(cfg))
    log.info("stage 2/5 done: embedder trained on the raw pool")

    curate_cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([
        f"curation.pool={pool_dir}", f"curation.output_dir={out / 'curate'}",
        f"curation.embed.backbone={embedder}"]))
    curation = run_curation(curate_cfg)
    shards_dir = stage_dir(curate_cfg, "shards")
    log.info("stage 3/5 done: curated shards in %s", shards_dir)

    teacher = train_stage(cfg, out / "train", shards_dir, final_overrides(cfg, embedder))
    log.info("stage 4/5 done: teacher trained on the curated shards")

    evaluation = evaluation_stage(cfg, out, teacher, synthetic_dir)
    log.info("stage 5/5 done: evaluation %s", evaluation)

    summary = build_summary(cfg, out, synthetic_dir, curate_cfg, curation, evaluation)
    summary["seconds"] = time.perf_counter() - started
    write_json(out / "summary.json", summary)
    write_demo_report(cfg, out, synthetic_dir, curate_cfg, teacher, summary)
    log.info("demo finished in %.0f s: %s", summary["seconds"], out / "report.html")
    return summary


def build_summary(cfg: DictConfig, out: Path, synthetic_dir: Path, curate_cfg: DictConfig, curation: dict,
                  evaluation: dict) -> dict[str, Any]:
    pool = open_pool(synthetic_dir / "pool")
    selected = np.load(stage_dir(curate_cfg, "sample") / "selected.npy")
    cluster_path = np.load(stage_dir(curate_cfg, "sample") / "cluster_path.npy")
    histograms = class_histograms(synthetic_dir, pool.keys, selected)
    metrics = read_metrics(out / "train" / "metrics.jsonl")
    return {
        "pool": {"n_items": len(pool), "readable": curation["embed"]["valid"]},
        "curation": {name: counts for name, counts in curation.items()},
        "duplicates": duplicate_scores(stage_dir(curate_cfg, "dedup"), synthetic_dir, pool.keys),
        "class_histogram": histograms,
        "normalised_class_entropy": {k: normalised_entropy(v) for k, v in histograms.items()},
        "cluster_class_purity": cluster_class_purity(synthetic_dir, pool.keys, selected, cluster_path),
        "training": {"iterations": len(metrics), "final_total_loss": metrics[-1]["total_loss"] if metrics else None,
                     "mean_images_per_s": float(np.mean([m["images_per_s"] for m in metrics[1:]] or [0.0]))},
        "evaluation": evaluation,
    }


def _bar_chart(histograms: dict[str, list[int]], names: Sequence[str]) -> bytes:
    fig = Figure(figsize=(10, 3))
    for ax, (title, counts) in zip(fig.subplots(1, 2), histograms.items()):
        ax.bar(range(len(counts)), counts, color="tab:blue" if title == "raw" else "tab:green")
        ax.set_xticks(range(len(counts)), names, rotation=60, fontsize=7)
        ax.set_title(f"{title}: normalised entropy {normalised_entropy(counts):.3f}")
    fig.tight_layout()
    return figure_png(fig, dpi=90)


def write_demo_report(cfg: DictConfig, out: Path, synthetic_dir: Path, curate_cfg: DictConfig, teacher: Path,
                      summary: dict) -> Path:
    pool = open_pool(synthetic_dir / "pool")
    selected = np.load(stage_dir(curate_cfg, "sample") / "selected.npy")
    rng = np.random.default_rng(cfg.seed)
    n_show = 12
    dedup = load_dedup_result(stage_dir(curate_cfg, "dedup"))
    groups = sorted(dedup.groups, key=lambda g: -len(g))[:4]
    duplicates = summary["duplicates"]
    entropy = summary["normalised_class_entropy"]
    purity = ", ".join(f"{p:.2f}" for p in summary["cluster_class_purity"])
    eval_rows = [["representation", "k-NN top-1", "linear top-1"]] + [
        [name, _fmt_accuracy(r["knn_top1"]), _fmt_accuracy(r["linear_top1"])] for name, r in summary["evaluation"].items()]
    dense_rows = [["representation", "mIoU (%)", "pixel accuracy (%)", "depth RMSE (m)", "depth δ1 (%)"]] + [
        [name, f"{r['segmentation_miou']:.1f}", f"{r['segmentation_pixel_accuracy']:.1f}", f"{r['depth_rmse']:.3f}",
         f"{r['depth_delta1']:.1f}"] for name, r in summary["evaluation"].items()]
    dense = cfg.eval.dense
    test_images = open_labelled(synthetic_dir / "eval_test", "val")
    # at the images' native size, twice the training crops: a finer patch grid (the position embedding is interpolated)
    pictures = render_pictures(load_backbone(teacher).eval(), test_images, image_size=cfg.demo.image_size,
                               n_images=cfg.demo.pictures)
    metrics = read_metrics(out / "train" / "metrics.jsonl")
    sections = [
        Section("Raw pool", f"{len(pool)} synthetic images with a long tail, duplicates and corrupt files.",
                images={"raw samples": thumbnail_row(pool, rng.choice(len(pool), n_show, replace=False))}),
        Section("Curated set", f"{len(selected)} images after dedup, hierarchical k-means and balanced sampling.",
                images={"curated samples": thumbnail_row(pool, rng.choice(selected, n_show, replace=False))}),
        Section("Duplicates", f"{duplicates['groups_found']} groups found; pairwise precision "
                f"{duplicates['precision']:.3f}, recall {duplicates['recall']:.3f} against the ground truth.",
                images={f"group {i}": thumbnail_row(pool, g[:8], highlight_first=True) for i, g in enumerate(groups)}),
        Section("Class balance", f"Normalised class entropy (labels hidden from curation): raw {entropy['raw']:.3f}, "
                f"curated {entropy['curated']:.3f}. Share of curated images in a cluster whose majority class "
                f"is theirs, per k-means level (finest first): {purity}; balanced sampling balances the "
                "classes only as far as the embedder's clusters follow them.",
                images={"class histograms": _bar_chart(summary["class_histogram"], CLASS_NAMES)}),
        Section("Cluster sizes per k-means level", "Before and after balanced sampling.",
                images={"cluster sizes": (stage_dir(curate_cfg, "report") / CLUSTER_SIZES_PNG).read_bytes()}),
        Section("Training", f"{len(metrics)} iterations on the curated shards; Gram anchoring in the last "
                f"{cfg.demo.gram_fraction:.0%}.", images={"loss curves": plot_loss_curves(metrics)}),
        Section("Evaluation", "Held-out labelled split; the same architecture at random init and raw pixels "
                "(16x16) as baselines.", table=eval_rows),
        Section("Dense probes", f"Linear segmentation (13 classes: background and the 12 shapes) and linear depth "
                f"(the ground plane 4-8 m, each object nearer the larger it is drawn) on the patch tokens of "
                f"{dense.image_size}-px images, per the DINOv2/DINOv3 linear protocol: a linear layer per patch, "
                f"outputs upsampled bilinearly to the label maps, {len(dense.lrs) * len(dense.weight_decays)} grid "
                f"points chosen on held-out train images. Baselines: the same ViT at random init and the raw pixels "
                f"of each {cfg.student.patch_size}-px patch. Rows of the picture: test images, their true and the "
                f"teacher's predicted masks and depth.", table=dense_rows,
                images={"dense predictions": (out / "eval" / DENSE_PICTURES).read_bytes()}),
        Section("Pictures", f"PCA of patch features (first component separates the foreground) and CLS attention "
                f"of the last layer, on {cfg.demo.image_size}-px images.", images=pictures),
    ]
    paths = write_report(out, "dinoscale demo", sections, summary)
    return paths["html"]


def _fmt_accuracy(value: float | dict[str, float]) -> str:
    """Accuracies are in percent; k-NN gives one per k."""
    if isinstance(value, dict):
        return ", ".join(f"k={k}: {v:.1f}%" for k, v in value.items())
    return f"{value:.1f}%"
