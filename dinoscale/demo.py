"""`dinoscale demo`: the whole pipeline on the embedded synthetic pool, stage by stage.

Each stage writes into its own folder under the output directory and is skipped on a re-run
once its `_SUCCESS.json` matches its configuration.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from dinoscale.data.pool import open_pool
from dinoscale.data.synthetic import SyntheticSpec, make_synthetic_pool
from dinoscale.utils.io import write_json
from dinoscale.utils.logging import get_logger
from dinoscale.utils.stages import is_done, mark_done, read_marker

log = get_logger(__name__)

FULL_SPEC = SyntheticSpec(n_images=3000, image_size=64)
QUICK_SPEC = SyntheticSpec(n_images=600, image_size=32, eval_per_class=15, n_corrupt=3)


def make_pool_stage(out: Path, spec: SyntheticSpec) -> dict:
    stage_dir = out / "synthetic"
    if is_done(stage_dir, asdict(spec)):
        log.info("synthetic pool: already done, skipping")
        return read_marker(stage_dir)["counts"]
    start = time.perf_counter()
    summary = make_synthetic_pool(stage_dir, spec)
    scan = open_pool(stage_dir / "pool").scan()
    counts = {"n_items": summary["n_items"], "readable": scan.readable, "skipped": scan.skipped,
              "class_counts": summary["class_counts"], "n_duplicate_copies": summary["n_duplicate_copies"]}
    mark_done(stage_dir, asdict(spec), counts, time.perf_counter() - start)
    log.info("synthetic pool: %s", scan)
    return counts


def run_demo(out: str | Path, quick: bool = False, overrides: Sequence[str] = ()) -> dict:
    out = Path(out)
    spec = QUICK_SPEC if quick else FULL_SPEC
    summary = {"pool": make_pool_stage(out, spec)}
    write_json(out / "summary.json", summary)
    log.info("demo finished; summary in %s", out / "summary.json")
    return summary
