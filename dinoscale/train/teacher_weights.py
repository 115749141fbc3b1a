"""Continuing from a trained teacher with its DINO and iBOT heads (`student.resume_from_teacher_chkpt`), as
DINOv3's high-resolution adaptation continues its pretraining run: the teacher's backbone and heads become
the student's, the EMA teacher is a copy of them, and so is the Gram teacher's backbone (refreshed from the
EMA teacher as `gram.*` says).

The source is a dinoscale run directory, whose latest DCP checkpoint is read shard by shard (any number of
ranks wrote it, any number reads it), or a file in the reference's layout `{"teacher": {"backbone.*",
"dino_head.*", "ibot_head.*"}}` (its `teacher_checkpoint.pth`), which rank 0 reads and broadcasts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from dinoscale.errors import CheckpointError
from dinoscale.train.checkpoint import latest_checkpoint
from dinoscale.train.parallel import fill_from_rank0
from dinoscale.train.ssl import SSLMetaArch, copy_weights
from dinoscale.utils.logging import get_logger

log = get_logger(__name__)


@torch.no_grad()
def load_teacher_with_heads(model: SSLMetaArch, source: str) -> None:
    """Student, EMA teacher and Gram-teacher backbone <- the teacher (backbone and heads) of `source`."""
    if Path(source).is_dir():
        _load_from_run(model, Path(source))
    else:
        _load_from_file(model, source)
    copy_weights(model.student, model.teacher)
    if model.gram_teacher is not None:
        copy_weights(model.student.backbone, model.gram_teacher.backbone)
    log.info("initialised student, teacher and heads from the teacher of %s", source)


def _load_from_run(model: SSLMetaArch, run_dir: Path) -> None:
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise CheckpointError(f"student.resume_from_teacher_chkpt = {run_dir} holds no checkpoint "
                              "(expected checkpoints/step_*); give a training run directory or a teacher file")
    state = get_model_state_dict(model.student)
    teacher_entries = {f"teacher.{name}": tensor for name, tensor in state.items()}  # read into the student's shards
    try:
        dcp.load({"model": teacher_entries}, checkpoint_id=str(checkpoint))
    except Exception as err:  # DCP raises several types for a missing or mis-shaped entry
        raise CheckpointError(f"{checkpoint} does not hold a teacher of this model (backbone and heads as "
                              f"student.*, dino.head_* and ibot.head_* say): {_first_line(err)}") from None
    set_model_state_dict(model.student, state, options=StateDictOptions(strict=True))


def _load_from_file(model: SSLMetaArch, path: str) -> None:
    shapes = {name: tuple(tensor.shape) for name, tensor in model.student.state_dict().items()}
    fill_from_rank0(model.student, lambda: _teacher_entries(path, shapes))


def _teacher_entries(path: str, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The `teacher` entries of a reference-layout file, checked against the student's keys and shapes."""
    if not Path(path).is_file():
        raise CheckpointError(f"student.resume_from_teacher_chkpt = {path} does not exist; give a training run "
                              "directory or a teacher file")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file that is not a checkpoint
        raise CheckpointError(f"{path} cannot be read as a PyTorch weights file: {_first_line(err)}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("teacher"), dict):
        raise CheckpointError(f"{path} has no 'teacher' entry with backbone and heads; a backbone-only file "
                              "(official release or dinoscale export) goes to student.pretrained_weights")
    # DINOv2 training runs chunk the blocks for FSDP: `blocks.<chunk>.<i>.` is block i
    entries = {re.sub(r"^backbone\.blocks\.\d+\.(\d+)\.", r"backbone.blocks.\1.", k): v.float()
               for k, v in obj["teacher"].items() if not k.endswith(".center")}
    missing = sorted(set(expected) - set(entries))
    if missing:
        heads = " (the file has no heads: continue from a run or a teacher file with its heads)" \
            if any(k.startswith(("dino_head.", "ibot_head.")) for k in missing) else ""
        raise CheckpointError(f"{path}: the teacher lacks {len(missing)} entries of this model, e.g. "
                              f"{', '.join(missing[:4])}{heads}")
    mis_shaped = [f"{k}: file {tuple(entries[k].shape)} vs model {shape}" for k, shape in expected.items()
                  if tuple(entries[k].shape) != shape]
    if mis_shaped:
        raise CheckpointError(f"{path}: the teacher does not fit this model (student.*, dino.head_*, ibot.head_*): "
                              f"{'; '.join(mis_shaped[:4])}")
    return {k: entries[k] for k in expected}


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
