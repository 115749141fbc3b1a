"""The EMA teacher's backbone out of training, in the official key layout (loadable with
`load_backbone`): at the end of a run (`export_teacher`, a collective; rank 0 writes), as a plain
copy for evaluation during training (`teacher_backbone`), and from a run's latest checkpoint in one
process, whatever number of ranks saved it (`export_run`: `dinoscale export RUN_DIR OUT.pth`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dinoscale.config import load_config
from dinoscale.data.config import CropsConfig
from dinoscale.data.crop_sizes import largest_crop_size, training_image_size
from dinoscale.errors import CheckpointError
from dinoscale.models.loading import meta_backbone, save_backbone
from dinoscale.models.vit import VisionTransformer
from dinoscale.train.checkpoint import latest_checkpoint
from dinoscale.train.ssl import SSLMetaArch

EXPORT_NAME = "export/teacher.pth"


def gathered_teacher_weights(model: SSLMetaArch, cpu_offload: bool = False) -> dict[str, torch.Tensor]:
    """The teacher backbone's whole state dict on every rank (a collective under FSDP)."""
    return get_model_state_dict(model.teacher.backbone,
                                options=StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload))


def teacher_backbone(model: SSLMetaArch) -> VisionTransformer:
    """A plain (unsharded) copy of the EMA teacher's backbone on every rank (a collective)."""
    backbone = meta_backbone(model.teacher.backbone.spec)
    backbone.load_state_dict(gathered_teacher_weights(model), assign=True)
    return backbone


def export_teacher(model: SSLMetaArch, path: Path, is_main: bool) -> None:
    """Gather the teacher backbone and write it with its training record (rank 0)."""
    full = gathered_teacher_weights(model, cpu_offload=True)
    if is_main:
        save_backbone(model.teacher.backbone, path, state_dict=full, training=training_record(model.cfg.crops))


def training_record(crops: CropsConfig) -> dict[str, int]:
    """What an export records of its training: the crop sizes (evaluation defaults to the global one), the
    largest of each with mixed resolution (the resolution the run adapted the model to)."""
    return {"global_crops_size": training_image_size(crops),
            "local_crops_size": largest_crop_size(crops.local_crops_size)}


def export_run(run_dir: str | Path, out: str | Path) -> Path:
    """Write the teacher backbone of the run's latest checkpoint; only that backbone is ever in memory."""
    run_dir, out = Path(run_dir), Path(out)
    config_file = run_dir / "config.yaml"
    checkpoint = latest_checkpoint(run_dir)
    if not config_file.exists() or checkpoint is None:
        raise CheckpointError(f"{run_dir} is not a training run with a checkpoint "
                              "(expected config.yaml and checkpoints/step_*)")
    cfg = load_config(str(config_file))
    with torch.device("meta"):
        backbone = SSLMetaArch(cfg).teacher.backbone
    backbone.to_empty(device="cpu")
    # the checkpoint's model entries are named from the SSL model's root; load only the teacher's backbone
    state = {f"teacher.backbone.{name}": tensor for name, tensor in backbone.state_dict().items()}
    dcp.load({"model": state}, checkpoint_id=str(checkpoint))
    save_backbone(backbone, out, training=training_record(cfg.crops))
    return out
