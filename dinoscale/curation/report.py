"""The curation reports: self-contained HTML pages (PNG figures inlined as base64).

The dedup stage writes `dedup/report.html`: what was removed and why (exact copies, near copies,
contamination), the size of the largest group, the largest groups and a random sample of groups as
pictures, each with its kept image framed green, so a person can look before sampling. The final
report repeats that section and adds cluster-size histograms per level before and after sampling
and example selected images of the largest top-level clusters.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from dinoscale.curation.kmeans import ClusterTree  # noqa: E402
from dinoscale.curation.shards import Selection  # noqa: E402
from dinoscale.data.pool import ImagePool  # noqa: E402
from dinoscale.utils.io import write_bytes, write_text  # noqa: E402

THUMB = 64
REPORT = "report.html"


def cluster_size_histograms(tree: ClusterTree, selection: Selection) -> bytes:
    """PNG: per level, how many clusters have each size, before and after sampling (log-spaced bins)."""
    before_paths = tree.point_clusters()
    n_levels = before_paths.shape[1]
    fig, axes = plt.subplots(1, n_levels, figsize=(4.2 * n_levels, 3.4), squeeze=False)
    for level, ax in enumerate(axes[0]):
        n_clusters = tree.levels[level].n_clusters
        before = np.bincount(before_paths[:, level], minlength=n_clusters)
        column = selection.cluster_path[:, level]
        after = np.bincount(column[column >= 0], minlength=n_clusters)
        top = max(int(before.max()), 1)
        bins = np.unique(np.geomspace(1, top + 1, num=min(30, top + 1)).astype(int))
        ax.hist(before[before > 0], bins=bins, alpha=0.6, label="pool (after dedup)")
        ax.hist(after[after > 0], bins=bins, alpha=0.6, label="curated")
        ax.set_xscale("log")
        ax.set_title(f"level {level + 1}: {n_clusters} clusters")
        ax.set_xlabel("cluster size (images)")
        ax.set_ylabel("clusters")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _figure_png(fig)


def thumbnail_row(pool: ImagePool, indices: Sequence[int], highlight_first: bool = False) -> bytes:
    """PNG: the images side by side as square thumbnails (grey for unreadable ones)."""
    pad = 3
    row = Image.new("RGB", (len(indices) * (THUMB + pad) + pad, THUMB + 2 * pad), (255, 255, 255))
    for j, index in enumerate(indices):
        image = pool.load(int(index))
        thumb = ImageOps.fit(image, (THUMB, THUMB)) if image is not None else Image.new("RGB", (THUMB, THUMB),
                                                                                        (128, 128, 128))
        if highlight_first and j == 0:  # the survivor of a duplicate group
            row.paste((40, 170, 60), (pad + j * (THUMB + pad) - 2, pad - 2, pad + j * (THUMB + pad) + THUMB + 2,
                                      pad + THUMB + 2))
        row.paste(thumb, (pad + j * (THUMB + pad), pad))
    buf = io.BytesIO()
    row.save(buf, format="PNG")
    return buf.getvalue()


def write_curation_report(directory: str | Path, pool: ImagePool | None, tree: ClusterTree, selection: Selection,
                          duplicate_groups: Sequence[np.ndarray], n_examples: int, counts: dict[str, Any]) -> Path:
    """Write `directory/report.html` (and the histogram as a PNG beside it); returns the HTML path."""
    directory = Path(directory)
    histogram = cluster_size_histograms(tree, selection)
    write_bytes(directory / "cluster_sizes.png", histogram)
    sections = [
        "<h2>Counts</h2>", f"<pre>{html.escape(json.dumps(counts, indent=2, sort_keys=True))}</pre>",
        "<h2>Cluster sizes per level, before and after sampling</h2>", _img(histogram),
    ]
    if pool is not None:
        sections += duplicate_section(pool, duplicate_groups, counts["dedup"], n_examples)
        sections += _cluster_section(pool, tree, selection, n_examples)
    return _write_page(directory, "Curation report", sections)


def write_dedup_report(directory: str | Path, pool: ImagePool, groups: Sequence[np.ndarray], counts: dict[str, Any],
                       n_examples: int, seed: int = 0) -> Path:
    """Write `directory/report.html`: the dedup stage's removals, to look at before sampling."""
    return _write_page(directory, "Dedup report", duplicate_section(pool, groups, counts, n_examples, seed))


def duplicate_section(pool: ImagePool, groups: Sequence[np.ndarray], counts: dict[str, Any], n_examples: int,
                      seed: int = 0) -> list[str]:
    """Removed per reason, the largest group, and the largest groups and a random sample of groups as pictures."""
    removed = (f"{counts.get('exact_duplicates', 0)} exact copies, {counts.get('near_duplicates', 0)} near copies and "
               f"{counts.get('contaminated_items', 0)} images of groups that touch an evaluation set removed; "
               f"{len(groups)} duplicate groups, the largest of {counts.get('largest_group', 1)} images. Every "
               "member of a group is a copy of its kept image (framed green).")
    parts = ["<h2>Duplicates</h2>", f"<p>{html.escape(removed)}</p>"]
    largest = sorted(range(len(groups)), key=lambda g: (-len(groups[g]), int(groups[g][0])))[:n_examples]
    rng = np.random.default_rng(seed)
    sample = sorted(rng.choice(len(groups), min(n_examples, len(groups)), replace=False).tolist()) if groups else []
    for title, chosen in ((f"The {len(largest)} largest groups", largest),
                          (f"{len(sample)} groups drawn at random", sample)):
        parts.append(f"<h3>{title}</h3>")
        for g in chosen:
            members = groups[g][:n_examples]
            caption = ", ".join(html.escape(pool.keys[int(i)]) for i in members)
            more = f" and {len(groups[g]) - len(members)} more" if len(groups[g]) > len(members) else ""
            parts.append(f"<figure>{_img(thumbnail_row(pool, members, highlight_first=True))}"
                         f"<figcaption>group {g} ({len(groups[g])} images): {caption}{more}</figcaption></figure>")
    return parts


def _write_page(directory: Path | str, title: str, sections: list[str]) -> Path:
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>dinoscale {title.lower()}</title>"
            "<style>body{font-family:sans-serif;margin:2em} figure{margin:0.5em 0} figcaption{font-size:0.8em}"
            f"</style></head><body><h1>{title}</h1>" + "\n".join(sections) + "</body></html>\n")
    write_text(Path(directory) / REPORT, page)
    return Path(directory) / REPORT


def _cluster_section(pool: ImagePool, tree: ClusterTree, selection: Selection, n_examples: int) -> list[str]:
    top = tree.point_clusters()[:, -1]
    sizes = np.bincount(top, minlength=tree.levels[-1].n_clusters)
    chosen = np.argsort(-sizes, kind="stable")[:n_examples]
    selected_top = selection.cluster_path[:, -1]
    parts = [f"<h2>Selected images of the {len(chosen)} largest top-level clusters</h2>"]
    for c in chosen:
        members = selection.indices[selected_top == c]
        caption = f"cluster {int(c)}: {int(sizes[c])} images in the pool, {len(members)} selected"
        row = _img(thumbnail_row(pool, members[:n_examples])) if len(members) else ""
        parts.append(f"<figure>{row}<figcaption>{caption}</figcaption></figure>")
    return parts


def _figure_png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})  # no version stamp: reproducible bytes
    plt.close(fig)
    return buf.getvalue()


def _img(png: bytes) -> str:
    return f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
