"""Reports: metrics parsing, plots, and the JSON / Markdown / self-contained HTML files."""

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from dinoscale.errors import DataError
from dinoscale.eval.report import knn_history, loss_keys, plot_knn_curve, plot_loss_curves, read_metrics
from dinoscale.utils.report import Section, write_report


def write_metrics(path, n: int = 20, cut_last_line: bool = False) -> list[dict]:
    records = [{"iteration": 10 * i, "total_loss": 11.0 - 0.3 * i, "dino_global_loss": 5.0 - 0.1 * i,
                "koleo_loss": -0.01 * i, "lr": 1e-3, "images_per_s": 123.0} for i in range(n)]
    text = "\n".join(json.dumps(r) for r in records) + "\n"
    if cut_last_line:
        text += '{"iteration": 200, "total_lo'
    path.write_text(text)
    return records


def _png_array(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_metrics_are_read_and_a_cut_off_last_line_is_skipped(tmp_path):
    records = write_metrics(tmp_path / "metrics.jsonl", cut_last_line=True)
    assert read_metrics(tmp_path / "metrics.jsonl") == records
    assert loss_keys(records) == ["total_loss", "dino_global_loss", "koleo_loss"]


def test_a_broken_line_inside_the_file_is_an_error(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"iteration": 0}\nnot json\n{"iteration": 1}\n')
    with pytest.raises(DataError, match="m.jsonl:2"):
        read_metrics(tmp_path / "m.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        read_metrics(tmp_path / "missing.jsonl")


def test_knn_history_comes_from_logged_knn_metrics():
    records = [{"iteration": 0, "total_loss": 3.0}, {"iteration": 100, "knn_top1_k20": 41.5, "knn_top5_k20": 80.0,
                                                     "knn_top1_k10": 40.0}]
    assert knn_history(records) == [{"iteration": 100, "top1": {20: 41.5, 10: 40.0}}]


def test_plots_are_pngs_with_content(tmp_path):
    records = write_metrics(tmp_path / "metrics.jsonl")
    losses = _png_array(plot_loss_curves(records))
    knn = _png_array(plot_knn_curve([{"iteration": 0, "top1": {10: 20.0}}, {"iteration": 5, "top1": {10: 35.0}}]))
    for image in (losses, knn):
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 5
    assert losses.shape[1] > 2 * losses.shape[0]  # three loss panels side by side
    with pytest.raises(DataError):
        plot_loss_curves([{"iteration": 0, "lr": 1.0}])


def test_report_files_markdown_links_and_self_contained_html(tmp_path):
    png = plot_knn_curve([{"iteration": 0, "top1": {10: 20.0}}, {"iteration": 5, "top1": {10: 35.0}}])
    sections = [Section("k-NN <accuracy>", "top-1 & top-5", [["k", "top-1"], ["10", "35.00"]], {"curve": png}),
                Section("Notes", "plain text")]
    results = {"knn": {"top1": {10: 35.0}}, "weights": "w.pth"}
    paths = write_report(tmp_path / "out", "Eval", sections, results)
    assert json.loads(paths["json"].read_text()) == {"knn": {"top1": {"10": 35.0}}, "weights": "w.pth"}

    markdown = paths["markdown"].read_text()
    assert "| k | top-1 |" in markdown and "| 10 | 35.00 |" in markdown
    linked = re.findall(r"!\[curve\]\(([^)]+)\)", markdown)
    assert len(linked) == 1 and (tmp_path / "out" / linked[0]).read_bytes() == png

    page = paths["html"].read_text()
    assert "k-NN &lt;accuracy&gt;" in page and "top-1 &amp; top-5" in page
    sources = re.findall(r"src='([^']+)'", page)
    assert len(sources) == 1 and sources[0].startswith("data:image/png;base64,")
    assert base64.b64decode(sources[0].split(",", 1)[1]) == png
