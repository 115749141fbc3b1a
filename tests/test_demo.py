"""`dinoscale demo --quick` end to end: the synthetic pool, curation, two training rounds,
evaluation and the report, then a re-run that skips every finished stage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dinoscale.demo.run import cluster_class_purity, run_demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = run_demo(out, quick=True)
    return out, summary


def test_quick_demo_writes_a_summary_and_a_self_contained_report(demo):
    out, summary = demo
    assert json.loads((out / "summary.json").read_text()) == summary
    html = (out / "report.html").read_text()
    # pool, curated set, duplicates, histograms, curves, dense predictions, pictures
    assert html.count("data:image/png;base64,") >= 9
    assert "Dense probes" in html and "mIoU" in html and "depth RMSE" in html
    for name, result in summary["evaluation"].items():  # the dense probes of each representation
        assert 0 <= result["segmentation_miou"] <= result["segmentation_pixel_accuracy"] <= 100, name
        assert result["depth_rmse"] > 0 and 0 <= result["depth_delta1"] <= 100, name
    assert "src=\"http" not in html and "src='http" not in html  # nothing to fetch
    corrupt = json.loads((out / "synthetic" / "corrupt.json").read_text())
    assert summary["pool"]["readable"] == summary["pool"]["n_items"] - len(corrupt) > 0


def test_quick_demo_finds_the_duplicates(demo):
    _, summary = demo
    duplicates = summary["duplicates"]
    assert duplicates["recall"] >= 0.9 and duplicates["precision"] >= 0.95, duplicates


def test_quick_demo_teacher_beats_random_init_and_raw_pixels(demo):
    _, summary = demo
    knn = {name: result["knn_top1"]["20"] for name, result in summary["evaluation"].items()}
    assert knn["trained teacher"] > knn["random init"] + 3, knn  # percent
    assert knn["trained teacher"] > knn["raw pixels"], knn


def test_rerunning_the_demo_skips_finished_stages(demo):
    out, summary = demo
    metrics = out / "train" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    again = run_demo(out, quick=True)
    assert metrics.stat().st_mtime_ns == before
    assert again["evaluation"] == summary["evaluation"]


def test_cluster_class_purity_is_the_share_in_their_clusters_majority_class(tmp_path):
    (tmp_path / "pool_labels.json").write_text(json.dumps({"a": 0, "b": 0, "c": 1, "d": 1, "bad": -1}))
    keys = ["a", "b", "c", "d", "bad"]
    selected = np.array([0, 1, 2, 3, 4])
    # finest level: {a, b, c} (majority class 0: 2 of 3) and {d, bad} (d alone is labelled); coarsest: one cluster
    cluster_path = np.array([[5, 0], [5, 0], [5, 0], [7, 0], [7, 0]])
    assert cluster_class_purity(tmp_path, keys, selected, cluster_path) == [3 / 4, 2 / 4]
