"""The curation reports (report.html, self-contained, with report.json and report.md beside it).

The dedup stage writes `dedup/report.html`: what was removed and why (exact copies, near copies,
contamination), the size of the largest group, the largest groups and a random sample of groups as
pictures, each with its kept image framed green, so a person can look before sampling. The final
report repeats those sections and adds the counts of every stage, cluster-size histograms per level
before and after sampling and example selected images of the largest top-level clusters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageOps

from dinoscale.curation.kmeans import ClusterTree
from dinoscale.curation.shards import Selection
from dinoscale.data.pool import ImagePool
from dinoscale.utils.report import Section, figure_png, image_png, write_report

THUMB = 64
CLUSTER_SIZES_PNG = "cluster_sizes_per_level_before_and_after_sampling.png"


def cluster_size_histograms(tree: ClusterTree, selection: Selection) -> bytes:
    """PNG: per level, how many clusters have each size, before and after sampling (log-spaced bins)."""
    before_paths = tree.point_clusters()
    n_levels = before_paths.shape[1]
    fig = Figure(figsize=(4.2 * n_levels, 3.4))
    for level, ax in enumerate(fig.subplots(1, n_levels, squeeze=False)[0]):
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
    return figure_png(fig, dpi=90)


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
    return image_png(row)


def write_curation_report(directory: str | Path, pool: ImagePool | None, tree: ClusterTree, selection: Selection,
                          duplicate_groups: Sequence[np.ndarray], n_examples: int, counts: dict[str, Any]) -> Path:
    """Write the report into `directory`; returns the HTML path."""
    sections = [Section("Counts", preformatted=json.dumps(counts, indent=2, sort_keys=True)),
                Section("Cluster sizes per level",
                        images={"before and after sampling": cluster_size_histograms(tree, selection)})]
    if pool is not None:
        sections += duplicate_sections(pool, duplicate_groups, counts["dedup"], n_examples)
        sections.append(_cluster_section(pool, tree, selection, n_examples))
    return write_report(directory, "Curation report", sections, counts)["html"]


def write_dedup_report(directory: str | Path, pool: ImagePool, groups: Sequence[np.ndarray], counts: dict[str, Any],
                       n_examples: int, seed: int = 0) -> Path:
    """Write the dedup stage's removals into `directory`, to look at before sampling; returns the HTML path."""
    return write_report(directory, "Dedup report", duplicate_sections(pool, groups, counts, n_examples, seed),
                        counts)["html"]


def duplicate_sections(pool: ImagePool, groups: Sequence[np.ndarray], counts: dict[str, Any], n_examples: int,
                       seed: int = 0) -> list[Section]:
    """Removed per reason and the largest group; the largest groups and a random sample of groups as pictures."""
    removed = (f"{counts.get('exact_duplicates', 0)} exact copies, {counts.get('near_duplicates', 0)} near copies and "
               f"{counts.get('contaminated_items', 0)} images of groups that touch an evaluation set removed; "
               f"{len(groups)} duplicate groups, the largest of {counts.get('largest_group', 1)} images. Every "
               "member of a group is a copy of its kept image (framed green).")
    largest = sorted(range(len(groups)), key=lambda g: (-len(groups[g]), int(groups[g][0])))[:n_examples]
    rng = np.random.default_rng(seed)
    sample = sorted(rng.choice(len(groups), min(n_examples, len(groups)), replace=False).tolist()) if groups else []
    return [Section(f"Duplicates: the {len(largest)} largest groups", text=removed,
                    images=_group_pictures(pool, groups, largest, n_examples)),
            Section(f"Duplicates: {len(sample)} groups drawn at random",
                    images=_group_pictures(pool, groups, sample, n_examples))]


def _group_pictures(pool: ImagePool, groups: Sequence[np.ndarray], chosen: Sequence[int], n_examples: int
                    ) -> dict[str, bytes]:
    images = {}
    for g in chosen:
        members = groups[g][:n_examples]
        more = f" and {len(groups[g]) - len(members)} more" if len(groups[g]) > len(members) else ""
        caption = f"group {g} ({len(groups[g])} images): " + ", ".join(pool.keys[int(i)] for i in members) + more
        images[caption] = thumbnail_row(pool, members, highlight_first=True)
    return images


def _cluster_section(pool: ImagePool, tree: ClusterTree, selection: Selection, n_examples: int) -> Section:
    top = tree.point_clusters()[:, -1]
    sizes = np.bincount(top, minlength=tree.levels[-1].n_clusters)
    chosen = np.argsort(-sizes, kind="stable")[:n_examples]
    selected_top = selection.cluster_path[:, -1]
    images = {}
    for c in chosen:
        members = selection.indices[selected_top == c]
        if len(members):
            caption = f"cluster {int(c)}: {int(sizes[c])} images in the pool, {len(members)} selected"
            images[caption] = thumbnail_row(pool, members[:n_examples])
    return Section(f"Selected images of the {len(chosen)} largest top-level clusters", images=images)
