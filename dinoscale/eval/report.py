"""What evaluation reports show: a run's metrics read back, its loss curves and k-NN history as
plots (written with dinoscale.utils.report).

Plots are drawn with matplotlib's object API on an Agg canvas, so no global backend is set.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure

from dinoscale.errors import DataError
from dinoscale.utils.logging import get_logger
from dinoscale.utils.report import figure_png

KNN_METRIC = re.compile(r"^knn_top1_k(\d+)$")

log = get_logger(__name__)


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
    return figure_png(figure, dpi=100, tight=True)


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
    return figure_png(figure, dpi=100, tight=True)
