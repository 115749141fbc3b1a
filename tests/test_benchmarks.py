"""The benchmark suite runner (benchmarks/suite.py) on fake benchmark modules, and the README's table."""

import argparse
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks.suite import Benchmark, Row, add_arguments, refresh_readme, render_markdown, run_suite
from dinoscale.cli import build_parser
from dinoscale.utils.io import read_json, write_json

ROOT = Path(__file__).parents[1]


def summarise_fake(out: dict) -> list[Row]:
    return [Row("fake figure, img/s", out["value"], "fake baseline", out["baseline"], out["value"] / out["baseline"]),
            Row("arguments", " ".join(out["argv"]))]


def test_suite_keeps_each_result_reports_failures_and_merges(tmp_path, monkeypatch):
    (tmp_path / "fake_bench_ok.py").write_text(textwrap.dedent("""
        import json, sys
        print(json.dumps({"n": 1}))  # a progress line before the report, as bench_curation prints
        print(json.dumps({"value": 30.0, "baseline": 15.0, "argv": sys.argv[1:]}, indent=2))
    """))
    (tmp_path / "fake_bench_broken.py").write_text("raise ValueError('no readable image in the pool')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    fakes = {"ok": Benchmark("fake_bench_ok", {"quick": ["--size", "1"], "default": ["--size", "9"]}, summarise_fake),
             "broken": Benchmark("fake_bench_broken", {"default": []}, summarise_fake)}
    out = tmp_path / "results"

    run_suite(fakes, ["ok", "broken"], "quick", out, timeout=120)

    results = read_json(out / "results.json")
    assert results["benchmarks"]["ok"]["result"] == {"value": 30.0, "baseline": 15.0, "argv": ["--size", "1"]}
    assert results["benchmarks"]["broken"]["error"] == "ValueError: no readable image in the pool"
    assert {"cpu", "cores", "memory_gib", "gpus", "torch", "faiss"} <= set(results["machine"])
    text = (out / "results.json").read_text()
    assert str(tmp_path) not in text and socket.gethostname() not in text
    table = (out / "results.md").read_text()
    assert table == render_markdown(results, fakes)
    assert "| fake figure, img/s | 30 | fake baseline | 15 | **2.00×** | — |" in table
    assert "| arguments | --size 1 |" in table
    assert "| **failed**: `ValueError: no readable image in the pool` |" in table

    previous = read_json(out / "results.json")  # as if measured on a CPU of the same model with other features
    previous["machine"]["cpu_capability"] = "OTHER"
    for entry in previous["benchmarks"].values():
        del entry["cpu_capability"]  # results.json files written before entries recorded it
    write_json(out / "results.json", previous)
    run_suite(fakes, ["ok"], "default", out, timeout=120)  # a re-run of one keeps the other's entry
    results = read_json(out / "results.json")
    assert results["benchmarks"]["ok"]["result"]["argv"] == ["--size", "9"]
    assert "error" in results["benchmarks"]["broken"]
    table = (out / "results.md").read_text()  # the kept entry says which CPU it was measured on
    assert "OTHER CPU)" in next(line for line in table.splitlines() if line.startswith("| `broken`"))
    assert "CPU)" not in next(line for line in table.splitlines() if line.startswith("| `ok`"))


def test_refresh_readme_replaces_only_the_block(tmp_path):
    (tmp_path / "results.md").write_text("| new | table |\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench-table:start -->\n| old |\n<!-- bench-table:end -->\nafter\n")
    refresh_readme(tmp_path / "results.md", readme)
    assert readme.read_text() == "intro\n<!-- bench-table:start -->\n| new | table |\n<!-- bench-table:end -->\nafter\n"


def test_dinoscale_bench_command_takes_the_suite_options():
    args = build_parser().parse_args(["bench", "--quick", "--only", "data", "embed"])
    suite = argparse.ArgumentParser()
    add_arguments(suite)
    parsed = suite.parse_args(args.suite_args)  # what `python -m benchmarks` receives
    assert (parsed.mode, parsed.only) == ("quick", ["data", "embed"])


def test_importing_dinoscale_and_its_command_line_does_not_import_benchmarks():
    code = ("import sys, dinoscale, dinoscale.cli; dinoscale.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m == 'benchmarks' or m.startswith('benchmarks.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"



def test_every_benchmark_of_the_suite_imports_and_parses_its_arguments():
    from benchmarks.suite import BENCHMARKS

    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    sys.argv = [name, '--help']\n"
            "    try:\n"
            "        importlib.import_module(name).main()\n"
            "    except SystemExit as done:\n"
            "        assert done.code in (0, None), name\n"
            "    print('parsed', name)\n")
    modules = [bench.module for bench in BENCHMARKS.values()] + ["benchmarks.curation_cost_model"]
    done = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [line for line in done.stdout.splitlines() if line.startswith("parsed ")] == [f"parsed {m}" for m in modules]


def test_curation_cost_model_counts_the_published_web_configuration():
    """The model's largest terms against n k d iterations written out here from the preset's numbers, and
    its GPU rate giving back the faiss figure it comes from."""
    from benchmarks.curation_cost_model import Gpu, Node, cost, main

    p100 = Gpu("P100 SXM2", 10.6e12, 21.2e12, 0.73e12)
    model = cost(10**9, "curate/web_4level", "dinov3_vitl16", Node(p100, 1e9), [16], level_1_on_all_points=True)
    macs = {t["what"]: t["macs"] for t in model["terms"]}
    assert macs["level 1: Lloyd"] == 50 * 10**9 * 100_000 * 1024
    assert macs["level 2, 10 resampling steps: Lloyd"] == 10 * 50 * (500_000 * 10) * 500_000 * 1024
    assert macs["level 2: Lloyd"] == 50 * (100_000 * 100) * 500_000 * 1024  # level 1 ends with 100 splits each
    lists = round(4 * 10**4.5)
    assert macs["scan 32 lists per query (8-bit codes)"] == pytest.approx(10**9 * 32 * 10**9 / lists * 1024, rel=1e-4)
    assert macs["find each row's 32 nearest lists (its list, and its probes as a query)"] == 10**9 * lists * 1024
    assert model["train_sample"] is None
    assert 1.28e14 / p100.macs_per_s("fp32") == pytest.approx(55.0)  # faiss: 55 s on one P100

    preset = cost(10**9, "curate/web_4level", "dinov3_vitl16", Node(p100, 1e9), [1], level_1_on_all_points=False)
    assert preset["train_sample"] == 25_600_000
    assert {t["what"]: t["macs"] for t in preset["terms"]}["level 1: Lloyd"] == 50 * 25_600_000 * 100_000 * 1024
    main(["--markdown", "--nodes", "16"])  # on the committed results.json
