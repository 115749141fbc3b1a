"""Curation on 1, 2 and 3 real processes (torchrun, gloo): the same dedup groups, k-means tree, sample
and shards as one process; the five-ring toy balanced on 2 processes; a rank killed during a k-means
level resumes from the last finished level; ranks that disagree on the data, and a failing rank, stop
the job with a clear error instead of a hang. The rank-side code is tests/curation_ranks.py."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dinoscale.curation.collective import Comm, block_range, smallest_in_groups
from dinoscale.data.synthetic import SyntheticSpec, make_synthetic_pool
from dinoscale.utils.stages import MARKER

pytestmark = pytest.mark.distributed

RANKS = Path(__file__).parent.parent / "curation_ranks.py"


def on_ranks(n: int, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """tests/curation_ranks.py ARGS alone (n=1) or on n torchrun ranks."""
    command = [sys.executable, str(RANKS), *args]
    if n > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *command[1:]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def test_one_two_and_three_ranks_give_the_same_groups_tree_and_sample(tmp_path):
    """Blocks of 1024 rows over 6,000 points: 3 ranks hold 2 blocks each. Everything must be equal to the
    bit: dedup (exact index and inverted file; and a random walk, whose groups hold only copies of their
    survivor), every level's assignment and centroids, the sample."""
    results = []
    for n in (1, 2, 3):
        on_ranks(n, "algorithms", str(tmp_path / f"{n}.npz"))
        results.append(np.load(tmp_path / f"{n}.npz"))
    one = results[0]
    assert (~one["flat_keep"]).sum() > 150 and one["flat_contaminated"].sum() >= 3
    assert len(one["sample"]) == 800 and len([k for k in one.files if k.startswith("assignment")]) == 3
    walk, groups = one["walk"].astype(np.float64), np.split(one["walk_members"], one["walk_group_starts"][1:])
    assert all((walk[g[1:]] @ walk[g[0]] > 0.9).all() for g in groups)  # members are copies of their survivor
    assert any((walk[g] @ walk[g].T <= 0.9).any() for g in groups)  # ... but not always of each other
    assert np.array_equal(one["walk_keep"], ~np.isin(np.arange(len(walk)), np.concatenate([g[1:] for g in groups])))
    for other in results[1:]:
        assert sorted(other.files) == sorted(one.files)
        assert [k for k in one.files if not np.array_equal(one[k], other[k])] == []


def test_distributed_selection_is_the_smallest_keys_per_group():
    """The bisection that 2+ ranks use, run as 3 simulated ranks (threads whose all-reduces meet in
    memory) against the definition: sort each group by key, then row, and take its quota."""
    rng = np.random.default_rng(0)
    groups, keys = rng.integers(0, 7, 3000), rng.random(3000).astype(np.float32)
    keys[::5] = 0.5  # many ties, broken by the row
    quota = np.array([0, 1, 5, 400, 2000, 3, 10 ** 6])
    barrier, shared, picked = threading.Barrier(3), [None] * 3, [None] * 3

    class ThreadRank(Comm):
        def _all_reduce(self, array, op):
            shared[self.rank] = np.asarray(array)
            barrier.wait()
            result = {"sum": np.sum, "min": np.min, "max": np.max}[str(op).split(".")[-1].lower()](
                np.stack(shared), axis=0)
            barrier.wait()
            return result

    def run(rank: int) -> None:
        rows = block_range(3000, rank, 3, 500)
        picked[rank] = smallest_in_groups(groups[rows.start:rows.stop], keys[rows.start:rows.stop], quota,
                                          rows.start, ThreadRank(rank, 3))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = np.zeros(3000, dtype=bool)
    for g in range(7):
        members = np.flatnonzero(groups == g)
        expected[members[np.lexsort((members, keys[members]))][:quota[g]]] = True
    np.testing.assert_array_equal(np.concatenate(picked), expected)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed_pool")
    make_synthetic_pool(root, SyntheticSpec(n_images=240, image_size=32, eval_per_class=1))
    return root / "pool"


CURATE = ["curate", "curate/small", "curation.kmeans.n_clusters=[30,6]", "curation.kmeans.n_resampling_steps=[3,3]",
          "curation.sampling.target_size=90", "curation.shards.shard_size=20", "curation.embed.batch_size=16"]


def curate(n: int, pool: Path, out: Path, *overrides: str, flags: tuple[str, ...] = (), check: bool = True
           ) -> subprocess.CompletedProcess:
    """`dinoscale curate` on n ranks; `flags` plant a failure (see tests/curation_ranks.py)."""
    return on_ranks(n, "cli", "-", *flags, *CURATE, f"curation.pool={pool}", f"curation.output_dir={out}",
                    *overrides, check=check)


def outputs(out: Path) -> dict[str, str]:
    """Digest of every output file but markers, logs, the report (it shows timings) and the embedding
    store's files (the same rows, in one file per rank)."""
    skip = ("logs", "report", "embed", "slurm")
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != MARKER and p.relative_to(out).parts[0] not in skip
            and not any(part.startswith(".") for part in p.parts)}


def embedded(out: Path) -> bytes:
    from dinoscale.curation.store import RowStore

    return b"".join(np.asarray(RowStore.open(out / "embed", name)).tobytes()
                    for name in ("embeddings", "copy_embeddings", "valid", "content_hashes", "pixel_counts"))


@pytest.mark.slow
def test_the_curate_command_on_two_and_three_ranks_writes_the_single_process_shards(pool, tmp_path):
    curate(1, pool, tmp_path / "one")
    reference = outputs(tmp_path / "one")
    assert len([k for k in reference if k.endswith(".tar")]) == 5
    for n in (2, 3):
        curate(n, pool, tmp_path / f"ranks{n}")
        assert outputs(tmp_path / f"ranks{n}") == reference
        assert embedded(tmp_path / f"ranks{n}") == embedded(tmp_path / "one")
        assert sorted(p.name for p in (tmp_path / f"ranks{n}" / "logs").glob("*.log")) == [
            f"rank{r:05d}.log" for r in range(n)]


@pytest.mark.slow
def test_five_rings_on_two_ranks_are_balanced_as_vo_et_al(tmp_path):
    """tests/curation/test_kmeans.py's five-ring toy, fitted and sampled on 2 processes over the same
    12 seeds: the published level (see the test there for why 12)."""
    on_ranks(2, "rings", str(tmp_path / "rings.json"), *map(str, range(12)), timeout=3600)
    counts = np.array(json.loads((tmp_path / "rings.json").read_text())).reshape(-1, 5)
    p = counts / counts.sum(axis=1, keepdims=True)
    entropies = -(p * np.log(np.where(p > 0, p, 1))).sum(axis=1) / np.log(5)
    print(f"ring entropy on 2 ranks: {entropies.mean():.4f}")
    assert counts.shape == (120, 5) and entropies.mean() >= 0.98


@pytest.mark.slow
def test_a_rank_killed_during_a_kmeans_level_resumes_from_the_last_finished_one(pool, tmp_path):
    curate(2, pool, tmp_path / "clean")
    killed = curate(2, pool, tmp_path / "killed", flags=("--kill-rank", "1", "--at-level", "1"), check=False)
    assert killed.returncode != 0
    levels = tmp_path / "killed" / "kmeans" / "levels"
    assert (levels / "level_0" / MARKER).exists() and not (levels / "level_1").exists()
    resumed = curate(2, pool, tmp_path / "killed")
    assert "k-means level 1: loaded from" in resumed.stderr
    assert outputs(tmp_path / "killed") == outputs(tmp_path / "clean")


def test_ranks_that_disagree_on_the_data_stop_before_any_work(tmp_path):
    done = on_ranks(2, "disagree", "-", check=False, timeout=300)
    assert done.returncode != 0
    assert "the ranks disagree on the k-means input" in done.stderr and "rows" in done.stderr
    assert "k-means level 1:" not in done.stderr


def test_ranks_with_different_configurations_stop_before_any_work(pool, tmp_path):
    done = curate(2, pool, tmp_path / "out", "curation.sampling.target_size=9${oc.env:RANK}", check=False)
    assert done.returncode != 0
    assert "dinoscale: error: the ranks disagree on the configuration" in done.stderr
    assert not (tmp_path / "out" / "embed").exists()


def test_a_failing_rank_stops_the_job_with_its_error(pool, tmp_path):
    """Rank 1 raises in the k-means stage while rank 0 waits in a collective: the job ends at once (torchrun
    stops rank 0, or rank 0 sees its peer leave and reports rank 1's error), with rank 1's message."""
    start = time.monotonic()
    done = curate(2, pool, tmp_path / "out", flags=("--fail-rank", "1"), check=False)
    assert done.returncode != 0 and time.monotonic() - start < 300
    assert "dinoscale: error: planted failure on rank 1" in done.stderr
    assert "planted failure on rank 1" in (tmp_path / "out" / "logs" / "rank00001.log").read_text()
    assert (tmp_path / "out" / "logs" / "rank00001.error").read_text().startswith("DataError: planted failure")
