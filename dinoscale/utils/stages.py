"""Stage markers: a stage that finished writes `_SUCCESS.json` with its config hash.

A re-run skips a stage whose marker matches its config, and redoes a stage without a marker
(it was interrupted) or with a marker of another config.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from dinoscale.config import config_hash
from dinoscale.utils.io import read_json, write_json

MARKER = "_SUCCESS.json"


def is_done(stage_dir: str | Path, config: Any) -> bool:
    marker = Path(stage_dir) / MARKER
    if not marker.exists():
        return False
    return read_json(marker).get("config_hash") == config_hash(config)


def read_marker(stage_dir: str | Path) -> dict:
    return read_json(Path(stage_dir) / MARKER)


def mark_done(stage_dir: str | Path, config: Any, counts: dict | None = None, seconds: float | None = None,
              **extra: Any) -> None:
    write_json(Path(stage_dir) / MARKER, {
        "config_hash": config_hash(config),
        "counts": counts or {},
        "seconds": seconds,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **extra,
    })


def clear_marker(stage_dir: str | Path) -> None:
    marker = Path(stage_dir) / MARKER
    if marker.exists():
        marker.unlink()


@contextmanager
def stage(stage_dir: str | Path, config: Any) -> Iterator[dict]:
    """Run a stage body unless done; the body fills the yielded dict with counts.

    Usage: `with stage(d, cfg) as counts: ...` — check `is_done` first to skip the body.
    """
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    clear_marker(stage_dir)
    counts: dict = {}
    start = time.perf_counter()
    yield counts
    mark_done(stage_dir, config, counts, time.perf_counter() - start)
