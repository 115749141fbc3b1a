"""Evaluation reports: `report.json` (the numbers), `report.md` (PNG files beside it) and a
self-contained `report.html` (PNGs embedded as base64), plus the plots they show.

Plots are drawn with matplotlib's object API on an Agg canvas, so no global backend is set.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dinoscale.errors import DataError
from dinoscale.utils.io import write_bytes, write_json, write_text
from dinoscale.utils.logging import get_logger

KNN_METRIC = re.compile(r"^knn_top1_k(\d+)$")

log = get_logger(__name__)


@dataclass
class Section:
    """A titled part of a report: a paragraph, an optional table (first row is the header), PNG plots."""

    title: str
    text: str = ""
    table: list[list[str]] | None = None
    images: dict[str, bytes] = field(default_factory=dict)


# ----------------------------------------------------------------------------- metrics
def read_metrics(path: str | Path) -> list[dict]:
    """A training run's metrics: one JSON object per line. A cut-off last line (a killed run) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"metrics file {path} does not exist; point --metrics at a run's metrics .jsonl")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                log.warning("%s: last line is incomplete (interrupted write?); skipping it", path)
                continue
            raise DataError(f"{path}:{number} is not a JSON object; the metrics file must be JSON lines") from None
        if isinstance(record, dict):
            records.append(record)
    return records


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def loss_keys(records: Sequence[dict]) -> list[str]:
    """Numeric keys ending in `loss` (total_loss, dino_global_loss, ...), total first."""
    keys = {k for r in records for k, v in r.items() if k.endswith("loss") and _is_number(v)}
    return sorted(keys, key=lambda k: (k != "total_loss", k))


def knn_history(records: Sequence[dict]) -> list[dict]:
    """k-NN top-1 over iterations from metrics logged as `knn_top1_k{K}` (by the online k-NN)."""
    points = []
    for r in records:
        top1 = {int(m.group(1)): v for k, v in r.items() if (m := KNN_METRIC.match(k)) and _is_number(v)}
        if top1 and "iteration" in r:
            points.append({"iteration": r["iteration"], "top1": top1})
    return points


# ----------------------------------------------------------------------------- plots
def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def plot_loss_curves(records: Sequence[dict], keys: Sequence[str] | None = None) -> bytes:
    """One small panel per loss against `iteration` (losses differ in scale and sign, e.g. KoLeo)."""
    keys = list(keys) if keys is not None else loss_keys(records)
    if not keys:
        raise DataError("the metrics hold no numeric `*loss` values to plot")
    n_cols = min(3, len(keys))
    n_rows = math.ceil(len(keys) / n_cols)
    figure = Figure(figsize=(4 * n_cols, 2.8 * n_rows))
    for i, key in enumerate(keys):
        axes = figure.add_subplot(n_rows, n_cols, i + 1)
        points = [(r["iteration"], r[key]) for r in records if "iteration" in r and _is_number(r.get(key))]
        axes.plot([p[0] for p in points], [p[1] for p in points], linewidth=1)
        axes.set_title(key, fontsize=9)
        axes.set_xlabel("iteration", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return _png(figure)


def plot_knn_curve(points: Sequence[dict]) -> bytes:
    """k-NN top-1 (percent) against iteration, one line per k; points: [{"iteration", "top1": {k: acc}}]."""
    if not points:
        raise DataError("no k-NN results to plot")
    figure = Figure(figsize=(5, 3.2))
    axes = figure.add_subplot(1, 1, 1)
    by_k: dict[int, list[tuple[int, float]]] = {}
    for point in points:
        for k, accuracy in point["top1"].items():
            by_k.setdefault(k, []).append((point["iteration"], accuracy))
    for k, series in sorted(by_k.items()):
        series.sort()
        axes.plot([s[0] for s in series], [s[1] for s in series], marker="o", markersize=3, label=f"{k}-NN")
    axes.set_xlabel("iteration")
    axes.set_ylabel("top-1 (%)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return _png(figure)


# ----------------------------------------------------------------------------- writing
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "figure"


def _markdown(title: str, sections: Sequence[Section], image_files: dict[tuple[int, str], str]) -> str:
    lines = [f"# {title}", ""]
    for s, section in enumerate(sections):
        lines += [f"## {section.title}", ""]
        if section.text:
            lines += [section.text, ""]
        if section.table:
            header, *body = section.table
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(row) + " |" for row in body]
            lines.append("")
        for name in section.images:
            lines += [f"![{name}]({image_files[(s, name)]})", ""]
    return "\n".join(lines)


def _html(title: str, sections: Sequence[Section]) -> str:
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "img{max-width:100%}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.text:
            parts.append(f"<p>{html.escape(section.text)}</p>")
        if section.table:
            header, *body = section.table
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body]
            parts.append("</table>")
        for name, png in section.images.items():
            data = base64.b64encode(png).decode()
            parts.append(f"<p><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'></p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out_dir: str | Path, title: str, sections: Sequence[Section], results: dict) -> dict[str, Path]:
    """Write report.json (`results`), report.md with its PNGs, and a self-contained report.html."""
    out_dir = Path(out_dir)
    image_files: dict[tuple[int, str], str] = {}
    for s, section in enumerate(sections):
        for name, png in section.images.items():
            filename = f"{_slug(section.title)}_{_slug(name)}.png"
            write_bytes(out_dir / filename, png)
            image_files[(s, name)] = filename
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md", "html": out_dir / "report.html"}
    write_json(paths["json"], results)
    write_text(paths["markdown"], _markdown(title, sections, image_files))
    write_text(paths["html"], _html(title, sections))
    return paths
