"""The SSL model built on meta, sharded and materialised has exactly the weights of eager
construction for the same seed, on 1 and 2 ranks (gloo), also with pretrained backbone weights
broadcast from rank 0; a missing weights file fails on every rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = Path(__file__).with_name("sharded_init_check.py")


def _run(nproc: int, folder: Path) -> list[dict]:
    command = [sys.executable, str(CHECK), str(folder)]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   *command[1:]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sharded_build_has_the_initial_weights_of_eager_construction(nproc, tmp_path):
    results = _run(nproc, tmp_path)
    built = [r for r in results if "different" in r]
    assert len(built) == 6  # three architectures, each without and with pretrained weights
    for result in built:
        assert result["world_size"] == nproc
        assert result["different"] == [] and result["extra"] == [], result
        assert result["same_rng_state"], result  # the global RNG is left where eager construction leaves it
        assert result["sharded_params"] == result["params"]  # every parameter is a DTensor shard
    (missing,) = [r for r in results if r["config"] == "missing_weights"]
    assert len(missing["errors"]) == nproc
    assert all(e and "missing.pth" in e and "does not exist" in e for e in missing["errors"])
