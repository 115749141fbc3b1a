"""A trained tiny teacher run and tiny distillation configs, shared by the distillation tests."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dinoscale.config import load_config
from dinoscale.train.trainer import train

from tiny_run import TINY, write_tiny_run

HERE = Path(__file__).parent
# the tiny student of tests/tiny_run.py, and a wider one
STUDENTS = {"narrow": [], "wide": ["student.embed_dim=48", "student.num_heads=3"]}


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory) -> Path:
    """A tiny run trained for 4 iterations (its checkpoint holds the EMA teacher and its heads)."""
    root = write_tiny_run(tmp_path_factory.mktemp("distill_teacher"))
    train(load_config(str(root / "tiny.yaml"), [f"train.dataset_path={root / 'data' / 'pool'}",
                                               f"train.output_dir={root / 'run'}", "train.iterations=4"]))
    return root


def write_distill_config(path: Path, teacher_root: Path, output_dir: Path, students: dict[str, list[int]],
                         iterations: int = 2, **train: object) -> Path:
    """A tiny distillation config: TINY without Gram anchoring and with KoLeo per rank, the teacher
    run of `teacher_run`, a global batch of 8, `students` {name: ranks_range}."""
    config = {section: dict(values) for section, values in TINY.items()}
    config["gram"] = {"use_loss": False}
    config["dino"]["koleo_loss_distributed"] = False
    config["optim"]["clip_grad"] = 0.0  # the tests compare raw gradients
    config["train"].update(dataset_path=str(teacher_root / "data" / "pool"), output_dir=str(output_dir),
                           iterations=iterations, **train)
    config["distill"] = {"teacher": str(teacher_root / "run"), "global_batch_size": 8,
                         "students": [{"name": name, "ranks_range": ranks, "overrides": STUDENTS[name]}
                                      for name, ranks in students.items()]}
    path.write_text(yaml.safe_dump(config))
    return path


def torchrun(nproc: int, *args: str, script: str | None = None, wait: bool = True):
    """`script` (default: the dinoscale CLI) with `args` under torchrun on `nproc` gloo ranks."""
    target = [str(HERE / script)] if script else ["-m", "dinoscale.cli"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *target, *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done
