"""Training checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a directory `RUN/checkpoints/step_NNNNNNN` holding the sharded model (student,
EMA teacher, Gram teacher, loss centres), the optimizer and `meta.json` (iteration, data
position). It is written under a temporary name and renamed by rank 0 after every rank
has finished, so a checkpoint directory that exists is complete. DCP reshards on load: a
checkpoint saved by 2 ranks resumes on 1 and the reverse.

RNG state is not saved: every random choice of a step (augmentations, masks, drop-path) is
seeded from (seed, iteration, rank), which makes a resumed run continue bit-for-bit without it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from dinoscale.distributed import barrier, rank
from dinoscale.utils.io import read_json, write_json

STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: str | Path, iteration: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any], keep_last: int, group: dist.ProcessGroup | None = None) -> Path:
    """Save on every rank of `group` (default: all ranks); returns the final directory once it is complete."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{iteration:07d}"
    tmp = root / f".tmp_step_{iteration:07d}"
    writer = _group_rank(group) == 0
    if writer:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier(group)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp), process_group=group)
    _barrier(group)
    if writer:
        write_json(tmp / "meta.json", {**meta, "iteration": iteration})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    _barrier(group)
    return final


def _group_rank(group: dist.ProcessGroup | None) -> int:
    return rank() if group is None else dist.get_rank(group)


def _barrier(group: dist.ProcessGroup | None) -> None:
    if group is None:
        barrier()
    else:
        dist.barrier(group=group)


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    group: dist.ProcessGroup | None = None) -> dict:
    """Load a checkpoint into (possibly sharded) model and optimizer, collectively over `group`
    (default: all ranks); returns its meta dict."""
    optimizers = [optimizer] if optimizer is not None else []
    model_state, optim_state = get_state_dict(model, optimizers)
    state: dict[str, Any] = {"model": model_state}
    if optimizer is not None:
        state["optim"] = optim_state
    dcp.load(state, checkpoint_id=str(path), process_group=group)
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state.get("optim", {}),
                   options=StateDictOptions(strict=True))
    return read_json(Path(path) / "meta.json")
