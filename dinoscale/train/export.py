"""`dinoscale export RUN_DIR OUT.pth`: the teacher backbone of a run's latest checkpoint as one
plain state dict in the official key layout (loadable with `load_backbone`), in one process,
whatever number of ranks saved the checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dinoscale.config import load_config
from dinoscale.errors import CheckpointError
from dinoscale.models.loading import save_backbone
from dinoscale.train.checkpoint import latest_checkpoint, load_checkpoint
from dinoscale.train.ssl import SSLMetaArch
from dinoscale.utils.io import read_json


def training_record(cfg: Any) -> dict[str, int]:
    """What an export records of its training: the crop sizes (evaluation defaults to the global one)."""
    return {"global_crops_size": cfg.crops.global_crops_size, "local_crops_size": cfg.crops.local_crops_size}


def export_run(run_dir: str | Path, out: str | Path) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    config_file = run_dir / "config.yaml"
    checkpoint = latest_checkpoint(run_dir)
    if not config_file.exists() or checkpoint is None:
        raise CheckpointError(f"{run_dir} is not a training run with a checkpoint "
                              "(expected config.yaml and checkpoints/step_*)")
    cfg = load_config(str(config_file))
    meta = read_json(checkpoint / "meta.json")
    model = SSLMetaArch(cfg, global_batch_size=meta["global_batch"])
    load_checkpoint(checkpoint, model, optimizer=None)
    save_backbone(model.teacher.backbone, out, training=training_record(cfg))
    return out
