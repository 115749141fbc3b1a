import pytest
import torch

from dinoscale.models import build_backbone
from tiny_run import TINY_STUDENT


# ----------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="session")
def tiny_student() -> dict:
    """The `student` fields of the tests' tiny ViT (2 blocks, 32 wide, 4-px patches, 16 px)."""
    return dict(TINY_STUDENT)


@pytest.fixture(scope="session")
def tiny_backbone():
    """tiny_backbone(seed=0, **fields): the tiny ViT (with `fields` changed), initialised from `seed`."""
    def build(seed: int = 0, **fields) -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_backbone({**TINY_STUDENT, **fields})
    return build


# ----------------------------------------------------------------------------- SLURM cluster
# A real slurmctld/slurmd/slurmdbd on localhost for the tests marked `slurm` (tests/slurm_cluster.py).


@pytest.fixture(scope="session")
def slurm_cluster():
    """A local SLURM cluster for the whole session; skipped only when its binaries are not installed.

    Yields a `LocalSlurmCluster` with `conf_path`, `env` ({"SLURM_CONF": ...}) and `partition`. For the
    rest of the session SLURM_CONF points at it (and an enclosing job's SLURM_* variables are unset), so
    submitit's sbatch/sacct calls and the jobs they start reach it.
    """
    from slurm_cluster import LocalSlurmCluster, missing_binaries

    missing = missing_binaries()
    if missing:
        pytest.skip(f"no local SLURM: {', '.join(missing)} not installed (run .ci/install_slurm.sh as root)")
    with LocalSlurmCluster() as cluster, pytest.MonkeyPatch.context() as monkeypatch:
        cluster.activate(monkeypatch)
        yield cluster
# ----------------------------------------------------------------------------- end SLURM cluster
