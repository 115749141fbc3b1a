"""The benchmark suite: every benchmark of `benchmarks/` in its own subprocess, one table of results.

    python -m benchmarks [--quick | --full] [--only NAME ...] [--out DIR]
    dinoscale bench ...                      # the same
    python -m benchmarks --readme            # re-render results.md from results.json into README.md

Each benchmark prints one JSON object; the suite keeps it whole in `results.json` with the machine
it ran on, and a small summariser per benchmark picks the figures for `results.md`: the measured
value, the baseline it is compared with (measured in the same run) and their ratio. A benchmark that
fails or times out is reported with its error line; the others are kept. `--only` re-runs some
benchmarks and keeps the other entries of an existing `results.json` from the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dinoscale.utils.io import read_json, write_json, write_text
from dinoscale.utils.machine import describe_machine

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
TABLE_START, TABLE_END = "<!-- bench-table:start -->\n", "<!-- bench-table:end -->"
MODES = ("quick", "default", "full")


@dataclass(frozen=True)
class Row:
    """One figure of the table. `ratio` says how many times better the measured value is than the
    baseline (faster, or less memory); `cpu_ratio` the same per CPU-second of the process."""

    figure: str
    value: float | str | None
    baseline: str = ""
    baseline_value: float | None = None
    ratio: float | None = None
    cpu_ratio: float | None = None


@dataclass(frozen=True)
class Benchmark:
    module: str
    args: dict[str, list[str]]  # per mode; "full" falls back to "default"
    summarise: Callable[[dict], list[Row]]

    def arguments(self, mode: str) -> list[str]:
        return self.args.get(mode, self.args["default"])


# ----------------------------------------------------------------------------- summarisers
def summarise_models(out: dict) -> list[Row]:
    rows = []
    for name, r in out["results"].items():
        precision, mode = name.split("_", 1)
        rows.append(Row(f"ViT-S/14 reg4 {mode.replace('_', '+')} {precision}, img/s", r["dinoscale_img_s"],
                        "timm", r["timm_img_s"], r["ratio_vs_timm_wall"], r["ratio_vs_timm_cpu_time"]))
    return rows


def summarise_train(out: dict) -> list[Row]:
    steps = out["one_process_interleaved_steps"]
    lightly = steps["lightly_dino_only"]
    one, two = out["trainer_full_objective_1_process"], out["trainer_full_objective_2_processes"]
    ac, compiled = out["activation_checkpointing"], out["compile"]
    rows = [
        Row("train step, DINO+iBOT+KoLeo+Gram, img/s", steps["full_objective"]["images_per_s"],
            "lightly DINO step", lightly["images_per_s"],
            out["ratio_full_objective_vs_lightly"], out["cpu_ratio_full_objective_vs_lightly"]),
        Row("train step, DINO+iBOT+KoLeo, img/s", steps["without_gram"]["images_per_s"], "lightly DINO step",
            lightly["images_per_s"], out["ratio_without_gram_vs_lightly"], out["cpu_ratio_without_gram_vs_lightly"]),
        Row("train step MFU, DINO+iBOT+KoLeo+Gram, %", 100 * steps["full_objective"]["mfu"], "lightly DINO step",
            100 * lightly["mfu"], steps["full_objective"]["mfu"] / lightly["mfu"]),
        Row("trainer, 2 processes, img/s", two["images_per_s"], "1 process", one["images_per_s"],
            out["ratio_2_vs_1_process"], out["cpu_ratio_2_vs_1_process"]),
    ]
    for mode in ("selective", "full"):
        memory, baseline_memory = ac[mode]["peak_rss_mb"], ac["none"]["peak_rss_mb"]
        rows += [Row(f"trainer peak memory, {mode} activation checkpointing, MB", memory,
                     "no checkpointing", baseline_memory, baseline_memory / memory),
                 Row(f"trainer speed, {mode} activation checkpointing", None, "no checkpointing", None,
                     ac[mode]["speed_vs_none"], ac[mode]["cpu_speed_vs_none"])]
    return rows + [
        Row("trainer with torch.compile, img/s", compiled["images_per_s"], "eager", None,
            compiled["speed_vs_eager"], compiled["cpu_speed_vs_eager"]),
        Row("trainer first step with torch.compile, s", compiled["first_step_s"], "eager",
            compiled["eager_first_step_s"], compiled["eager_first_step_s"] / compiled["first_step_s"]),
    ]


def summarise_data(out: dict) -> list[Row]:
    baselines = {"webdataset_multicrop": "webdataset + torchvision multi-crop",
                 "webdataset_decode_crop": "webdataset decode + 1 crop"}
    rows = []
    for workers, r in out["workers"].items():
        for pool, baseline in (("shards", "webdataset_multicrop"), ("folder", "webdataset_multicrop"),
                               ("shards", "webdataset_decode_crop")):
            name = f"dinoscale_{pool}"
            rows.append(Row(f"data loader, {pool}, {workers} worker{'' if workers == '1' else 's'}, img/s",
                            r[name]["images_per_s"], baselines[baseline], r[baseline]["images_per_s"],
                            r[f"ratio_{name}_vs_{baseline}"], r.get(f"cpu_ratio_{name}_vs_{baseline}")))
    return rows


def summarise_embed(out: dict) -> list[Row]:
    return [
        Row("embed ViT-S/16 224 px bf16, img/s", out["vit_s16_224_bf16"]["images_per_s"], "fp32",
            out["vit_s16_224_fp32"]["images_per_s"], out["bf16_speedup_vit_s16"]),
        Row("embed tiny ViT 32 px bf16, img/s", out["tiny_32_bf16"]["images_per_s"], "fp32",
            out["tiny_32_fp32"]["images_per_s"], out["bf16_speedup_tiny"]),
        Row("embed pixels copy-detection 8 px, img/s", out["pixels_8"]["images_per_s"]),
    ]


def summarise_eval(out: dict) -> list[Row]:
    knn, features, linear = out["knn"], out["features"], out["linear"]
    dense = knn["variants"]["dense"]

    def search_mib(r: dict) -> float:
        return r["peak_rss_mib"] - r["rss_before_search_mib"]

    rows = []
    for name in ("chunked_default", "chunked_small"):
        r = knn["variants"][name]
        rows += [Row(f"k-NN {name.replace('_', ' ')}, bank {knn['bank']:,}, queries/s", r["queries_per_s"],
                     "one dense similarity matrix", dense["queries_per_s"], r["speed_vs_dense"]),
                 Row(f"k-NN {name.replace('_', ' ')} search memory, MiB", search_mib(r), "one dense similarity matrix",
                     search_mib(dense), 1 / r["search_memory_vs_dense"] if r["search_memory_vs_dense"] > 0 else None)]
    return rows + [
        Row("eval features ViT-S/16 bf16, img/s", features["bf16"]["images_per_s"], "fp32",
            features["fp32"]["images_per_s"], features["bf16_speedup"]),
        Row(f"linear-probe grid of {linear['grid_points']} points, s", linear["batched_seconds"],
            "one run per point", linear["one_run_per_point_seconds"], linear["batched_speedup"]),
    ]


def summarise_eval_files(out: dict) -> list[Row]:
    """Feature extraction from image files against the per-image torchvision transform, and the resize
    done per image (PIL) against a batched torch resize."""
    files = out["files"]
    if "skipped" in files:
        return [Row("eval features from image files", files["skipped"])]
    baseline = files["per_image_transform"]
    rows = []
    for workers in ("0", "2"):
        r = files[f"dinoscale_{workers}_workers"]
        rows.append(Row(f"eval features, {files['images']} icon files at {files['image_size']} px, {workers} workers, "
                        "img/s", r["images_per_s"], "per-image torchvision transform, 1 process",
                        baseline["images_per_s"], r["speedup_vs_per_image_transform"],
                        r.get("cpu_speedup_vs_per_image_transform")))
    for case, r in files["resize"].items():
        rows.append(Row(f"eval resize {case.replace('_', ' ')}, PIL per image, CPU us/img", r["pil_per_image_us"],
                        "torch, whole batch at once", r["torch_batched_us"], 1 / r["batched_speedup"]))
    return rows


def summarise_curation(out: dict) -> list[Row]:
    rows = []
    for r in out["results"]:
        rows += [Row(f"dedup, {r['n']:,} points ({r['dedup_index']} index), s", r["dedup_s"]),
                 Row(f"hierarchical k-means, {r['n']:,} points, s", r["kmeans_s"], "plain-PyTorch k-means",
                     r.get("torch_baseline_s"), r.get("speedup_vs_torch"), r.get("cpu_speedup_vs_torch"))]
    compared = [r for r in out["results"] if "torch_baseline_balance" in r]
    if compared:  # the speed-up holds at equal or better balance
        r = compared[-1]
        rows.append(Row(f"balance of a hierarchical sample, {r['n']:,} points", r["kmeans_balance"],
                        "plain-PyTorch k-means's sample", r["torch_baseline_balance"],
                        r["kmeans_balance"] / r["torch_baseline_balance"]))
    largest = out["results"][-1]
    return rows + [
        Row(f"balance of a hierarchical sample, {largest['n']:,} points", largest["kmeans_balance"],
            "uniform random sample", largest["random_sample_balance"],
            largest["kmeans_balance"] / largest["random_sample_balance"]),
        Row("dedup growth exponent (time ~ N^x)", _exponents(out, "dedup")),
        Row("hierarchical k-means growth exponent (time ~ N^x)", _exponents(out, "kmeans")),
    ]


def summarise_build(out: dict) -> list[Row]:
    arch, n = out["arch"], out["sharded"]["world_size"]
    sharded, eager = out["sharded_peak_rss_per_rank_mib"], out["eager_peak_rss_mib"]
    rows = [Row(f"build {arch} student+teacher+Gram teacher ({out['params'] / 1e9:.2f} B params), peak host memory "
                f"per rank, {n} ranks sharded, MiB", sharded, "whole model on every rank", eager, eager / sharded)]
    if "sharded_fixed_mmap_threshold_peak_rss_per_rank_mib" in out:
        fixed = out["sharded_fixed_mmap_threshold_peak_rss_per_rank_mib"]
        rows.append(Row("the same, glibc heap with a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_=131072), MiB",
                        fixed, "whole model on every rank", eager, eager / fixed))
    dry = out["dry_build"]
    for ranks, r in sorted(dry["per_rank"].items(), key=lambda item: int(item[0])):  # JSON sorts "256" first
        rows.append(Row(f"dry build {dry['arch']}: weights, grads, AdamW, teachers per rank on {ranks} GPUs, GiB",
                        r["per_rank_gib"], "whole model on every rank (weights only)",
                        dry["unsharded_weights_per_rank_before_gib"],
                        dry["unsharded_weights_per_rank_before_gib"] / r["per_rank_gib"]))
    return rows


def summarise_dense(out: dict) -> list[Row]:
    reps = out["representations"]
    teacher = reps["trained teacher"]
    rows = []
    for baseline in ("random init", "raw pixels"):
        other = reps[baseline]
        rows += [Row("segmentation mIoU of the demo's teacher, %", teacher["segmentation_miou"], baseline,
                     other["segmentation_miou"], teacher["segmentation_miou"] / other["segmentation_miou"]),
                 Row("depth RMSE of the demo's teacher, m", teacher["depth_rmse"], baseline, other["depth_rmse"],
                     other["depth_rmse"] / teacher["depth_rmse"])]
    comparison = out.get("gram_comparison")
    if comparison:
        seeds = len(comparison["seeds"])
        with_gram, without = comparison["with_gram"], comparison["without_gram"]
        for key, figure, lower_is_better in (
                ("segmentation_miou", "segmentation mIoU, %", False), ("depth_rmse", "depth RMSE, m", True),
                (f"knn_top1_k{out['knn_k']}", f"k-NN@{out['knn_k']} top-1, %", False)):
            w, wo = with_gram[key], without[key]
            rows.append(Row(f"{figure}, with Gram anchoring ({seeds} seeds: mean, range)",
                            f"{w['mean']:.3g} ({w['min']:.3g}–{w['max']:.3g})",
                            f"without Gram ({wo['min']:.3g}–{wo['max']:.3g})", wo["mean"],
                            wo["mean"] / w["mean"] if lower_is_better else w["mean"] / wo["mean"]))
    return rows


def summarise_dedup_real(out: dict) -> list[Row]:
    default = out["default"]
    name = f"{default['copy_detection']} at cosine {default['threshold']}, {out['set']['items']:,} real images"
    rows = [Row(f"near dedup {name}: pairwise precision", default["precision"]),
            Row(f"near dedup {name}: pairwise recall", default["recall"]),
            Row(f"near dedup {name}: groups holding two different pictures", default["mixed_groups"])]
    for candidate, result in out["candidates"].items():
        precise = [c for c in result["curve"] if c["precision"] >= 0.9]
        best = max(precise, key=lambda c: c["recall"]) if precise else None
        rows.append(Row(f"copy detection `{candidate}`: recall at precision >= 0.9",
                        f"{best['recall']:.3f} (cosine {best['threshold']})" if best else "not reached"))
    for embedder, entropy in out.get("category_entropy", {}).items():
        rows.append(Row(f"category entropy of the curated subset, {embedder} embedder", entropy["curated"],
                        "uniform random subset", entropy["uniform_random"], entropy["curated"] / entropy["uniform_random"]))
    return rows


def summarise_curation_scale(out: dict) -> list[Row]:
    rows = []
    for r in out["results"]:
        by = {run["processes"]: run for run in r["runs"]}
        what = f"whole curation, {r['n']:,} points on disk"
        for p, run in sorted(by.items()):
            one = by.get(1) if p > 1 else None
            rows.append(Row(f"{what}, {p} process{'es' if p > 1 else ''}: wall s", run["wall_s"],
                            "1 process" if one else "", one["wall_s"] if one else None,
                            one["wall_s"] / run["wall_s"] if one else None,
                            one["cpu_s"] / run["cpu_s"] if one else None))
            rows.append(Row(f"{what}, {p} process{'es' if p > 1 else ''}: peak RSS per process, MiB",
                            run["peak_rss_mib_per_process"], "the embeddings' size on disk", r["embeddings_mib"],
                            r["embeddings_mib"] / run["peak_rss_mib_per_process"]))
        if "same_result_1_and_2_processes" in r:
            rows.append(Row(f"{what}: 2 processes give the 1-process result",
                            "yes" if r["same_result_1_and_2_processes"] else "NO"))
    return rows


def _exponents(out: dict, name: str) -> str:
    wall, cpu = out[f"{name}_growth_exponent"], out[f"{name}_cpu_growth_exponent"]
    return "needs two sizes" if wall is None else f"{wall:.2f} (CPU time {cpu:.2f})"


def summarise_distill(out: dict) -> list[Row]:
    knn, steps = out["knn_top1_k20"], out["student_iterations"]
    gap, scratch_gap = out["gap_to_teacher_distilled_points"], out["gap_to_teacher_scratch_points"]
    seconds = out["seconds"]
    return [
        Row(f"k-NN@20 of a 2-block student distilled from a {out['teacher_iterations']}-step teacher "
            f"({knn['teacher']:.1f}%) for {steps} steps, %", knn["distilled_student"],
            "same student, SSL from scratch", knn["scratch_student"], knn["distilled_student"] / knn["scratch_student"]),
        Row("its gap to the teacher's k-NN@20, points", gap, "same student, SSL from scratch", scratch_gap,
            scratch_gap / gap if gap > 0 else None),
        Row(f"distillation, {steps} steps, s", seconds["distillation"], "SSL from scratch", seconds["scratch_training"],
            seconds["scratch_training"] / seconds["distillation"]),
    ]


BENCHMARKS = {
    "models": Benchmark("benchmarks.bench_models", {
        "quick": ["--batch-size", "2", "--img-size", "56", "--rounds", "1"],
        "default": ["--batch-size", "8", "--rounds", "5", "--threads", "1"]}, summarise_models),
    "train": Benchmark("benchmarks.bench_train", {
        "quick": ["--steps", "3", "--batch", "4", "--repeats", "1"],
        "default": ["--steps", "8", "--batch", "16", "--repeats", "3"]}, summarise_train),
    "data": Benchmark("benchmarks.bench_data", {
        "quick": ["--images", "200", "--batch", "16", "--batches", "2", "--rounds", "1"],
        "default": ["--images", "2000", "--batch", "64", "--batches", "20", "--rounds", "3"]}, summarise_data),
    "embed": Benchmark("benchmarks.bench_embed", {
        "quick": ["--images", "8", "--batch-size", "8"],
        "default": ["--images", "64", "--batch-size", "32"]}, summarise_embed),
    "eval": Benchmark("benchmarks.bench_eval", {
        "quick": ["--bank", "5000", "--queries", "200", "--images", "8", "--image-size", "64",
                  "--parts", "knn", "features", "linear"],
        "default": ["--bank", "100000", "--queries", "2000", "--images", "32", "--parts", "knn", "features",
                    "linear"]}, summarise_eval),
    "eval_files": Benchmark("benchmarks.bench_eval", {
        "quick": ["--parts", "files", "--files", "64", "--rounds", "1"],
        "default": ["--parts", "files", "--files", "800", "--rounds", "3"]}, summarise_eval_files),
    "dense": Benchmark("benchmarks.bench_dense", {
        "quick": ["--quick", "--gram-seeds"],
        "default": ["--gram-seeds", "0", "1"]}, summarise_dense),
    "curation": Benchmark("benchmarks.bench_curation", {
        "quick": ["--max-n", "10000", "--baseline-max-n", "10000"],
        "default": ["--max-n", "100000", "--baseline-max-n", "100000"],
        "full": ["--max-n", "1000000", "--baseline-max-n", "100000"]}, summarise_curation),
    "build": Benchmark("benchmarks.bench_build", {
        "quick": ["--arch", "vit_small", "--dry-arch", "vit_large"],
        "default": ["--arch", "vit_giant2", "--dry-arch", "vit_7b"]}, summarise_build),
    "curation_scale": Benchmark("benchmarks.bench_curation_scale", {
        "quick": ["--sizes", "100000"], "default": ["--sizes", "100000", "1000000"],
        "full": ["--sizes", "100000", "1000000", "10000000", "--one-process-max-n", "1000000"]},
        summarise_curation_scale),
    "dedup_real": Benchmark("benchmarks.bench_dedup_real", {
        "quick": ["--max-pictures", "100"], "default": []}, summarise_dedup_real),
    "distill": Benchmark("benchmarks.bench_distill", {
        "quick": ["--teacher-iterations", "40", "--student-iterations", "20", "--pool-images", "600"],
        "default": []}, summarise_distill),
}


# ----------------------------------------------------------------------------- running
def run_benchmark(bench: Benchmark, mode: str, timeout: float) -> dict:
    """One benchmark in a subprocess: its JSON (the last top-level object it printed) or its error line."""
    command = [sys.executable, "-m", bench.module, *bench.arguments(mode)]
    entry = {"mode": mode, "command": " ".join(command[1:]), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
             "load_average_start": os.getloadavg()[0]}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        lines = done.stdout.splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("{")]
        if done.returncode != 0 or not starts:
            errors = [line for line in done.stderr.splitlines() if line.strip()]
            entry["error"] = errors[-1] if errors else f"exit status {done.returncode} and no JSON printed"
        else:
            entry["result"] = json.loads("\n".join(lines[starts[-1]:]))
    except subprocess.TimeoutExpired:
        entry["error"] = f"timed out after {timeout:.0f} s"
    entry["seconds"] = round(time.perf_counter() - start, 1)
    entry["load_average_end"] = os.getloadavg()[0]
    return entry


def run_suite(benchmarks: dict[str, Benchmark], names: list[str], mode: str, out_dir: Path, timeout: float) -> dict:
    """Run `names` of `benchmarks`, writing results.json and results.md after each one."""
    # faiss and torch spin-wait in OpenMP by default, which starves other processes on a small machine
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    machine = describe_machine()
    results = {"machine": machine, "benchmarks": {}}
    previous = out_dir / "results.json"
    if previous.exists() and set(names) != set(benchmarks):
        old = read_json(previous)
        if {k: old["machine"].get(k) for k in ("cpu", "cores", "memory_gib")} == \
                {k: machine[k] for k in ("cpu", "cores", "memory_gib")}:
            results["benchmarks"] = {k: {"cpu_capability": old["machine"]["cpu_capability"], **v}
                                     for k, v in old["benchmarks"].items() if k in benchmarks}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        print(f"[bench] {name} ({mode}) ...", file=sys.stderr, flush=True)
        entry = results["benchmarks"][name] = {**run_benchmark(benchmarks[name], mode, timeout),
                                               "cpu_capability": machine["cpu_capability"]}
        print(f"[bench] {name}: {'failed: ' + entry['error'] if 'error' in entry else 'done'} in {entry['seconds']} s",
              file=sys.stderr, flush=True)
        write_json(out_dir / "results.json", results)
        write_text(out_dir / "results.md", render_markdown(results, benchmarks))
    return results


# ----------------------------------------------------------------------------- rendering
def _number(x: float | str | None) -> str:
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _ratio(x: float | None, bold: bool = False) -> str:
    if x is None:
        return "—"
    return f"**{x:.2f}×**" if bold else f"{x:.2f}×"


def render_markdown(results: dict, benchmarks: dict[str, Benchmark]) -> str:
    m = results["machine"]
    gpus = ", ".join(m["gpus"]) or "no GPU"
    lines = [
        f"Machine: {m['cpu']} ({m['cpu_capability']}), {m['usable_cores']} of {m['cores']} cores usable, "
        f"{m['memory_gib']} GiB, {gpus}; "
        f"torch {m['torch']}, faiss {m['faiss']}, Python {m['python']}, OMP_WAIT_POLICY={m['omp_wait_policy']}.",
        "Each ratio compares the measured figure with its baseline measured in the same run: how many times "
        "faster (or smaller in memory) it is; above 1 is better. *per CPU-s* is the same per CPU-second of the "
        "benchmark process, steadier when other jobs share the cores. Modes: quick (smoke test), default "
        "(laptop-sized; curation up to 10^5 points, the whole curation on disk up to 10^6), full (curation up to "
        "10^6 points, the whole curation on disk up to 10^7). *load* is the 1-minute "
        "load average before and after the benchmark.",
        "",
        "| benchmark | figure | measured | baseline | baseline value | ratio | per CPU-s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, bench in benchmarks.items():
        entry = results["benchmarks"].get(name)
        if entry is None:
            continue
        # kept entries may come from a run on another machine of the same CPU model, cores and memory
        other_cpu = entry.get("cpu_capability", m["cpu_capability"]) != m["cpu_capability"]
        label = (f"`{name}` ({entry['mode']}, {entry['seconds'] / 60:.1f} min, "
                 f"load {entry['load_average_start']:.1f}→{entry['load_average_end']:.1f}"
                 f"{', ' + entry['cpu_capability'] + ' CPU' if other_cpu else ''})")
        if "error" in entry:
            lines.append(f"| {label} | **failed**: `{entry['error'].replace('|', '/')}` | | | | | |")
            continue
        for row in bench.summarise(entry["result"]):
            lines.append(f"| {label} | {row.figure} | {_number(row.value)} | {row.baseline} | "
                         f"{_number(row.baseline_value)} | {_ratio(row.ratio, bold=True)} | {_ratio(row.cpu_ratio)} |")
            label = ""
    return "\n".join(lines) + "\n"


def refresh_readme(results_md: Path, readme: Path) -> None:
    """Put results.md between the README's bench-table markers."""
    text = readme.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise SystemExit(f"{readme.name} has no {TABLE_START.strip()} ... {TABLE_END} block")
    head, rest = text.split(TABLE_START, 1)
    write_text(readme, head + TABLE_START + results_md.read_text() + TABLE_END + rest.split(TABLE_END, 1)[1])


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--quick", dest="mode", action="store_const", const="quick",
                       help="tiny sizes: a smoke test of every benchmark (minutes)")
    modes.add_argument("--full", dest="mode", action="store_const", const="full",
                       help="as the default, with curation up to 10^6 points")
    modes.add_argument("--readme", dest="mode", action="store_const", const="readme",
                       help="run nothing: re-render results.md from results.json and copy it into README.md")
    parser.set_defaults(mode="default")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME",
                        help=f"run only these ({', '.join(BENCHMARKS)}); other entries of results.json are kept")
    parser.add_argument("--out", type=Path, default=HERE, help="folder of results.json and results.md "
                                                               "(default: the benchmarks package)")
    parser.add_argument("--timeout", type=float, default=4 * 3600,
                        help="seconds per benchmark before it counts as failed")


def run(args: argparse.Namespace) -> int:
    if args.mode == "readme":
        write_text(args.out / "results.md", render_markdown(read_json(args.out / "results.json"), BENCHMARKS))
        refresh_readme(args.out / "results.md", README)
        print(f"README.md's benchmark table now shows {args.out / 'results.md'}")
        return 0
    results = run_suite(BENCHMARKS, args.only or list(BENCHMARKS), args.mode, args.out, args.timeout)
    print(f"wrote {args.out / 'results.json'} and results.md; "
          "`python -m benchmarks --readme` puts the table in README.md")
    return int(any("error" in e for e in results["benchmarks"].values()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
