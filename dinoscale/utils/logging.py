"""Logging and progress: rank 0 only, a bar on a terminal, a periodic line otherwise."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

from dinoscale.distributed import launcher_rank

T = TypeVar("T")
logger = logging.getLogger("dinoscale")


def setup_logging(level: int = logging.INFO) -> None:
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank{launcher_rank()}] %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level if launcher_rank() == 0 else logging.WARNING)
    logger.propagate = False


def log_to_file(path: str | os.PathLike) -> logging.Handler:
    """Also write every INFO line of this process (any rank) to `path`; returns the handler to remove."""
    setup_logging()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank{launcher_rank()}] %(levelname)s %(message)s", "%H:%M:%S"))
    for existing in logger.handlers:  # the terminal keeps showing rank 0's INFO and the others' warnings
        existing.setLevel(logger.level)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def get_logger(name: str) -> logging.Logger:
    setup_logging()
    return logger.getChild(name.removeprefix("dinoscale."))


def progress(items: Iterable[T], desc: str, total: int | None = None, log_every_s: float = 30.0) -> Iterator[T]:
    """Iterate with a progress bar on a terminal (rank 0), or a log line every `log_every_s`."""
    if launcher_rank() != 0:
        yield from items
        return
    if sys.stderr.isatty():
        yield from tqdm(items, desc=desc, total=total, dynamic_ncols=True)
        return
    log = get_logger("progress")
    start = last = time.perf_counter()
    count = 0
    for item in items:
        yield item
        count += 1
        now = time.perf_counter()
        if now - last >= log_every_s:
            last = now
            of = f"/{total}" if total else ""
            log.info("%s: %d%s (%.1f/s)", desc, count, of, count / (now - start))
