"""`dinoscale demo --quick` end to end: the synthetic pool, curation, two training rounds,
evaluation and the report, then a re-run that skips every finished stage."""

from __future__ import annotations

import json

import pytest

from dinoscale.demo import run_demo

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
    assert html.count("data:image/png;base64,") >= 8  # pool, curated set, duplicates, histograms, curves, pictures
    assert "src=\"http" not in html and "src='http" not in html  # nothing to fetch


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
