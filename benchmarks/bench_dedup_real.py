"""Near-duplicate detection and balanced sampling on real images (`dinoscale.data.real_images`).

Builds the real-image set (oxygen icons at 8-256 px, GNOME wallpapers, scikit-image photos, with
planted copies: exact, JPEG, resize, crop, brightness, caption, overlay, padding), embeds it with
each copy-detection candidate and scores the dedup groups against the ground truth over a range of
thresholds (pairwise precision and recall, per edit type, groups that hold two different pictures):

- `descriptor`: the model-free copy-detection descriptor (colour layout, gradient orientations,
  colour histogram) at 32 px;
- `pdq`: Meta's PDQ perceptual hash at 64 px;
- `ssl`: the CLS features of a demo-budget SSL backbone (`--ssl-weights`, e.g. the export of
  `dinoscale train demo train.dataset_path=POOL optim.epochs=10 gram.use_loss=false`) at 32 px;
- `model`: a TorchScript copy-detection model the user gives (`--copy-model`, e.g. SSCD) at 224 px.

Then the headline at the default settings of `curate/small`, and balanced sampling with icon
contexts (and wallpaper / photo) as categories: normalised category entropy of the raw pool, of a
uniform random subset and of the `curate/small` curated subset of the same size, with the
descriptor and with the SSL backbone as the curation embedder.

    python -m benchmarks.bench_dedup_real [--work DIR] [--max-pictures N] [--ssl-weights FILE] [--copy-model FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from dinoscale.utils.machine import describe_machine, peak_rss_mib
from dinoscale.config import load_config
from dinoscale.curation import embed
from dinoscale.curation.dedup import deduplicate
from dinoscale.curation.dedup_eval import score_groups, truth_from_real_set
from dinoscale.curation.kmeans import fit_hierarchical_kmeans
from dinoscale.curation.sampling import hierarchical_sample
from dinoscale.data.pool import open_pool
from dinoscale.data.real_images import RealSetSpec, build_real_set, load_real_set
from dinoscale.demo.run import normalised_entropy

THRESHOLDS = {
    "descriptor": (0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995),
    "pdq": (0.5, 0.6, 0.7, 0.76, 0.8, 0.85, 0.9, 0.95),
    "ssl": (0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995),
    "model": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
}
IMAGE_SIZES = {"descriptor": 32, "pdq": 64, "ssl": 32, "model": 224}


def embed_pool(pool, name: str, weights: str, work: Path) -> tuple[dict[str, np.ndarray], float]:
    """The candidate's embeddings with the pool's validity, hashes and pixel counts (cached in `work`)."""
    cached = work / f"embeddings_{name}.npz"
    if cached.exists():
        arrays = dict(np.load(cached))
        return arrays, float(arrays.pop("seconds"))
    cfg = OmegaConf.create({"arch": None, "features": "cls", "precision": "auto"})
    start = time.perf_counter()
    embedder = embed.build_embedder(weights, IMAGE_SIZES[name], cfg, key=f"--{name}")
    result = embed.embed_slice(pool, range(len(pool)), {embed.COPY: embedder}, "", 128, 2)
    seconds = time.perf_counter() - start
    arrays = {key: result.arrays[key] for key in ("valid", "content_hashes", "pixel_counts")}
    arrays["x"] = result.arrays[embed.COPY].astype(np.float32)
    np.savez(cached, seconds=seconds, **arrays)
    return arrays, seconds


def dedup_scores(arrays: dict, pool, truth, threshold: float, k: int) -> dict:
    cfg = load_config("curate/small").curation.dedup
    cfg.threshold, cfg.k = threshold, k
    result = deduplicate(arrays["x"], cfg, hashes=arrays["content_hashes"], pixel_counts=arrays["pixel_counts"],
                         keys=pool.keys)
    return {"threshold": threshold, **score_groups(result.groups, truth, arrays["valid"]), "kept": result.counts["kept"]}


def category_entropy(main: np.ndarray, copies: dict, pool, categories: np.ndarray, seed: int = 0) -> dict:
    """Normalised category entropy of the raw pool, a uniform random subset and the `curate/small` curated
    subset (dedup on the `copies` embedding, k-means and sampling on `main`)."""
    cfg = load_config("curate/small").curation
    result = deduplicate(copies["x"], cfg.dedup, hashes=copies["content_hashes"],
                         pixel_counts=copies["pixel_counts"], keys=pool.keys)
    candidates = np.flatnonzero(result.keep & copies["valid"])
    tree = fit_hierarchical_kmeans(main[candidates], cfg.kmeans, seed=seed)
    curated = candidates[hierarchical_sample(tree, cfg.sampling, seed=seed).indices]
    readable = np.flatnonzero(copies["valid"])
    random_subset = np.random.default_rng(seed).choice(readable, len(curated), replace=False)
    names = sorted(set(categories))

    def entropy(indices: np.ndarray) -> float:
        return normalised_entropy([int((categories[indices] == c).sum()) for c in names])

    return {"size": len(curated), "raw": entropy(readable),
            "uniform_random": entropy(random_subset), "curated": entropy(curated)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", help="folder for the set and cached embeddings (default: a temporary one)")
    parser.add_argument("--max-pictures", type=int, help="a seeded subset of this many pictures (all their sizes)")
    parser.add_argument("--ssl-weights", help="a demo-budget SSL backbone (weights file or run directory)")
    parser.add_argument("--copy-model", help="a TorchScript copy-detection model")
    parser.add_argument("--k", type=int, default=16, help="neighbours in the k-NN graph")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if not (work / "real_set.json").exists():
            build_real_set(work, RealSetSpec(max_pictures=args.max_pictures))
        real_set, pool = load_real_set(work), open_pool(work / "pool")
        truth = truth_from_real_set(real_set, pool.keys)
        report = {"set": {**real_set["counts"], "build_s": time.perf_counter() - start,
                          "lookalike_pictures": real_set["lookalike_pictures"]}, "candidates": {}}
        candidates = {"descriptor": embed.DESCRIPTOR, "pdq": embed.PDQ, "ssl": args.ssl_weights,
                      "model": args.copy_model}
        embedded = {}
        for name, weights in candidates.items():
            if not weights:
                continue
            arrays, seconds = embed_pool(pool, name, weights, work)
            embedded[name] = arrays
            curve = [dedup_scores(arrays, pool, truth, t, args.k) for t in THRESHOLDS[name]]
            report["candidates"][name] = {"image_size": IMAGE_SIZES[name], "embed_s": seconds,
                                          "images_per_s": len(pool) / seconds, "curve": curve}
            print(json.dumps({name: [(c["threshold"], round(c["precision"], 4), round(c["recall"], 4),
                                      c["mixed_groups"]) for c in curve]}), flush=True)
        defaults = load_config("curate/small").curation
        report["default"] = {"copy_detection": defaults.embed.copy_detection, "k": defaults.dedup.k,
                             **dedup_scores(embedded[defaults.embed.copy_detection], pool, truth,
                                            defaults.dedup.threshold, defaults.dedup.k)}
        categories = np.array([real_set["items"][key]["category"] for key in pool.keys])
        report["category_entropy"] = {name: category_entropy(embedded[name]["x"], embedded["descriptor"], pool,
                                                             categories) for name in ("descriptor", "ssl")
                                      if name in embedded}
        report["peak_rss_mib"] = peak_rss_mib()
        report["machine"] = describe_machine()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
