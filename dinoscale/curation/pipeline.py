"""The curation stage runner: embed -> dedup -> kmeans -> assign -> sample -> shards -> report.

Each stage is described by one `Stage` record: the stage whose output it reads, the config
sections its output depends on, what else it reads from outside the pipeline, and its body (in
dinoscale/curation/stages.py) — one function, or a slice function and a merge. Each stage writes
into its own folder under `curation.output_dir` and finishes with a `_SUCCESS.json` marker holding
the hash of its key (those config sections, the seed when it draws random numbers, its outside
inputs, and the key hash of its upstream stage), so a re-run skips finished stages and redoes a
stage that was killed or whose inputs changed.

`embed`, `assign` and `shards` are parallel: `run_stage(cfg, name, slice=(i, n))` does slice i
of n (one SLURM array task) and `merge_stage(cfg, name, n)` joins them. Slices are cut on fixed
block boundaries (embedding batches, assignment blocks, whole shards), so the merged output is
byte-identical to a single-process run whatever n is. `run_stage(cfg, name)` without a slice
merges a complete set of slices already on disk, or runs the stage as one slice.

The embed stage's slices stay where they were written: merging lists them as one row store
(`store`), which the later stages read through memory maps, each rank its own rows.

`dedup`, `kmeans` and `sample` are collective: under torchrun or a multi-task SLURM job
(`launch.curation_ranks`) every rank runs them on its own blocks of rows and exchanges what it
must, and rank 0 writes the output; the parallel stages then run one slice per rank, merged by
rank 0, and `report` runs on rank 0. The results are those of a single process. The k-means tree
is fitted on the dedup survivors (its first k-means on `kmeans.train_sample` of them, if set);
the `assign` stage then puts every survivor in its nearest first-level cluster, in parallel.
Sampling, retrieval (when `retrieval.seed_sets` are given) and the shards use that assignment.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from dinoscale.config import config_hash
from dinoscale.curation import stages as bodies
from dinoscale.curation.collective import Comm
from dinoscale.curation.dedup import check_threshold
from dinoscale.curation.launch import curation_ranks
from dinoscale.curation.stages import CurationRun, dedup_embedder
from dinoscale.errors import ConfigError, DataError
from dinoscale.utils.io import atomic_dir
from dinoscale.utils.logging import get_logger
from dinoscale.utils.stages import is_done, mark_done, read_marker

log = get_logger(__name__)

SLICES = "parts"
SLICE_NAME = re.compile(r"\d{5}-of-(\d{5})")  # killed writes leave hidden '.NAME.xxx.tmp' folders beside

Slice = tuple[int, int]


@dataclass(frozen=True)
class Stage:
    """One curation stage.

    upstream: the stage whose output it reads (and, through it, every stage before that one);
    config: entries of its key -> config paths under `curation.` (a section or a single knob);
    ignored: knobs of those sections that do not change the output (e.g. worker counts);
    seeded: the key holds the seed; inputs: key entries for what it reads from outside the pipeline;
    run: the body of a one-process stage; run_slice + merge: those of a parallel one;
    collective: `run` runs on every rank of a process group, each on its own rows, and rank 0
    writes (a one-process stage that is not collective runs on rank 0 only);
    keeps_slices: the merged output lists its slices instead of copying them (they stay);
    needs_pool: skipped when `curation.pool` is empty.
    """

    upstream: str | None = None
    config: dict[str, str] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()
    seeded: bool = False
    inputs: Callable[[CurationRun], dict] = lambda run: {}
    run: Callable[[CurationRun], dict] | None = None
    run_slice: Callable[[CurationRun, int, int, Path], dict] | None = None
    merge: Callable[[CurationRun, list[Path]], dict] | None = None
    collective: bool = False
    keeps_slices: bool = False
    needs_pool: bool = False

    @property
    def parallel(self) -> bool:
        return self.run_slice is not None


STAGES: dict[str, Stage] = {
    "embed": Stage(config={"embed": "embed"}, ignored=("num_workers",), inputs=bodies.source_inputs,
                   run_slice=bodies.embed_slice, merge=bodies.embed_merge, keeps_slices=True),
    "dedup": Stage(upstream="embed", config={"dedup": "dedup"}, inputs=bodies.reference_inputs,
                   run=bodies.dedup_stage, collective=True),
    "kmeans": Stage(upstream="dedup", config={"kmeans": "kmeans"}, seeded=True, run=bodies.kmeans_stage,
                     collective=True),
    "assign": Stage(upstream="kmeans", run_slice=bodies.assign_slice, merge=bodies.assign_merge),
    "sample": Stage(upstream="assign", config={"sampling": "sampling", "retrieval": "retrieval"}, seeded=True,
                    inputs=bodies.seed_set_inputs, run=bodies.sample_stage, collective=True),
    "shards": Stage(upstream="sample", config={"shards": "shards"}, seeded=True, run_slice=bodies.shards_slice,
                    merge=bodies.shards_merge, needs_pool=True),
    "report": Stage(upstream="sample", config={"examples": "report_examples"}, run=bodies.report_stage),
}


# ----------------------------------------------------------------------------- public API
def list_stages(cfg: DictConfig) -> list[str]:
    """The stages this config runs, in order (no shards without a pool of images to write)."""
    return [name for name, stage in STAGES.items() if not stage.needs_pool or cfg.curation.pool]


def stage_is_parallel(name: str) -> bool:
    return _stage(name).parallel


def stage_is_collective(name: str) -> bool:
    """Whether stage `name` runs on every rank of a process group, each on its own rows."""
    return _stage(name).collective


def stage_dir(cfg: DictConfig, name: str) -> Path:
    _stage(name)
    return Path(cfg.curation.output_dir) / name


def stage_is_done(cfg: DictConfig, name: str) -> bool:
    return is_done(stage_dir(cfg, name), _Runner(cfg).key(name))


def run_stage(cfg: DictConfig, name: str, slice: Slice | None = None) -> dict:
    """Run one stage (or one slice of a parallel stage) unless it is done; returns its counts.
    On every rank of a process group: see the module docstring."""
    stage = _stage(name)
    comm = Comm.current()
    if slice is not None and not stage.parallel:
        parallel = ", ".join(n for n, s in STAGES.items() if s.parallel)
        raise ConfigError(f"stage '{name}' runs in one process; only {parallel} take --slice")
    if slice is not None and comm.world > 1:
        raise ConfigError(f"--slice runs one slice in one process; under torchrun or a multi-task job the "
                          f"{comm.world} ranks share stage '{name}' out themselves: drop --slice")
    runner = _Runner(cfg)
    runner.require_upstream(name)
    if comm.broadcast(runner.done(name)):
        log.info("%s: already done, skipping", name)
        return read_marker(runner.dir(name))["counts"]
    if slice is not None:
        return runner.run_slice(name, *_check_slice(slice))
    if stage.parallel:
        n = comm.world if comm.world > 1 else runner.complete_slice_count(name) or 1
        if comm.world > 1 or n == 1:
            runner.run_slice(name, comm.rank, n)
        comm.barrier()
        return comm.broadcast(merge_stage(cfg, name, n) if comm.is_main else None)
    start = time.perf_counter()
    counts = stage.run(runner.run) if stage.collective or comm.is_main else None
    if comm.is_main:
        mark_done(runner.dir(name), runner.key(name), counts, time.perf_counter() - start)
        log.info("%s: done %s", name, counts)
    comm.barrier()
    return comm.broadcast(counts)


def merge_stage(cfg: DictConfig, name: str, n: int) -> dict:
    """Join slices 0..n-1 of a parallel stage and mark the stage done."""
    stage = _stage(name)
    if not stage.parallel:
        raise ConfigError(f"stage '{name}' has no slices to merge")
    runner = _Runner(cfg)
    if runner.done(name):
        return read_marker(runner.dir(name))["counts"]
    slices = [runner.slice_dir(name, i, n) for i in range(n)]
    missing = [i for i, directory in enumerate(slices) if not is_done(directory, runner.key(name))]
    if missing:
        raise DataError(f"stage '{name}': slices {missing[:10]} of {n} are not done; run them with "
                        f"--stage {name} --slice i/{n} before merging")
    start = time.perf_counter()
    counts = stage.merge(runner.run, slices)
    mark_done(runner.dir(name), runner.key(name), counts, time.perf_counter() - start)
    _remove_stale_slices(runner.dir(name) / SLICES, {d.name for d in slices} if stage.keeps_slices else set())
    log.info("%s: merged %d slices %s", name, n, counts)
    return counts


def run_curation(cfg: DictConfig, stage: str | None = None, slice: Slice | None = None) -> dict:
    """Run every unfinished stage in order, or only `stage` (and only `slice` of it); on every rank
    when launched as several (torchrun, a multi-task SLURM job)."""
    if stage is None and slice is not None:
        raise ConfigError("--slice needs --stage: name the parallel stage the slice belongs to")
    with curation_ranks(cfg):
        if stage in (None, "embed", "dedup"):
            check_threshold(dedup_embedder(cfg.curation.embed)[0], cfg.curation.dedup.threshold)
        if stage is not None:
            return {stage: run_stage(cfg, stage, slice)}
        return {name: run_stage(cfg, name) for name in list_stages(cfg)}


def parse_slice(text: str) -> Slice:
    """'i/n' -> (i, n)."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--slice {text!r} is not of the form i/n (e.g. 0/4)") from None
    return _check_slice((i, n))


# ----------------------------------------------------------------------------- one call
class _Runner:
    """The stage keys and folders of one call, and the slices of parallel stages."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.run = CurationRun(cfg, self.key)
        self._keys: dict[str, dict] = {}

    def dir(self, name: str) -> Path:
        return stage_dir(self.cfg, name)

    def slice_dir(self, name: str, i: int, n: int) -> Path:
        return self.dir(name) / SLICES / f"{i:05d}-of-{n:05d}"

    def key(self, name: str) -> dict:
        """Everything the output of stage `name` depends on (its marker stores the hash)."""
        if name not in self._keys:
            stage, key = STAGES[name], {}
            if stage.upstream is not None:
                key["up"] = config_hash(self.key(stage.upstream))
            for entry, path in stage.config.items():
                value = OmegaConf.select(self.cfg.curation, path)
                plain = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value
                key[entry] = {k: v for k, v in plain.items() if k not in stage.ignored} \
                    if isinstance(plain, dict) else plain
            if stage.seeded:
                key["seed"] = self.cfg.seed
            self._keys[name] = {**key, **stage.inputs(self.run)}
        return self._keys[name]

    def done(self, name: str) -> bool:
        return is_done(self.dir(name), self.key(name))

    def require_upstream(self, name: str) -> None:
        stages = list_stages(self.cfg)
        if name not in stages:
            raise ConfigError(f"stage '{name}' is not part of this run (stages: {', '.join(stages)}); "
                              "the shards stage needs curation.pool")
        needed, upstream = set(), STAGES[name].upstream
        while upstream is not None:
            needed.add(upstream)
            upstream = STAGES[upstream].upstream
        for before in (n for n in STAGES if n in needed):
            if not self.done(before):
                raise DataError(f"stage '{name}' needs stage '{before}' finished first (no matching marker in "
                                f"{self.dir(before)}); run `dinoscale curate ... --stage {before}`")

    def complete_slice_count(self, name: str) -> int | None:
        """n of a set of slices 0..n-1 already done for this key (e.g. by an array job), if any."""
        root = self.dir(name) / SLICES
        names = [p.name for p in root.iterdir()] if root.exists() else []
        counts = {int(m.group(1)) for m in map(SLICE_NAME.fullmatch, names) if m}
        for n in sorted(counts, reverse=True):
            if all(is_done(self.slice_dir(name, i, n), self.key(name)) for i in range(n)):
                return n
        return None

    def run_slice(self, name: str, i: int, n: int) -> dict:
        directory = self.slice_dir(name, i, n)
        if is_done(directory, self.key(name)):
            log.info("%s slice %d/%d: already done, skipping", name, i, n)
            return read_marker(directory)["counts"]
        start = time.perf_counter()
        with atomic_dir(directory) as tmp:
            counts = STAGES[name].run_slice(self.run, i, n, tmp)
            mark_done(tmp, self.key(name), counts)
        log.info("%s slice %d/%d: done in %.1fs %s", name, i, n, time.perf_counter() - start, counts)
        return counts


# ----------------------------------------------------------------------------- helpers
def _stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"unknown curation stage '{name}'; stages: {', '.join(STAGES)}")
    return STAGES[name]


def _remove_stale_slices(root: Path, kept: set[str]) -> None:
    """Remove every slice folder under `root` (and killed writes' leftovers) but those `kept`."""
    if not kept:
        shutil.rmtree(root, ignore_errors=True)
        return
    for stale in sorted(root.iterdir()):
        if stale.name not in kept:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


def _check_slice(slice: Slice) -> Slice:
    i, n = slice
    if not (isinstance(i, int) and isinstance(n, int) and 0 <= i < n):
        raise ConfigError(f"slice {i}/{n} is invalid: need 0 <= i < n, e.g. --slice 0/4")
    return i, n
