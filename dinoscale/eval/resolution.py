"""The resolution an evaluation runs at: `eval.image_size` when set, else the one the weights were
trained at (global crop size), as their export records it or as the training run's config.yaml
beside them says; 224, the DINO protocol's, for weights that say nothing (official releases)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dinoscale.data.config import CropsConfig
from dinoscale.data.crop_sizes import training_image_size
from dinoscale.eval.config import EvalConfig
from dinoscale.eval.features import describe_resize
from dinoscale.models.loading import read_training_record

PROTOCOL_IMAGE_SIZE = 224
RUN_CONFIG = "config.yaml"
RUN_DEPTH = 3  # RUN/export/teacher.pth and RUN/checkpoints/step_N/... lie at most this far below RUN


@dataclass(frozen=True)
class EvalResolution:
    image_size: int
    resize: str
    source: str  # where image_size comes from

    def describe(self) -> str:
        return f"{self.image_size} px ({self.source}); {describe_resize(self.image_size, self.resize)}"

    def as_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "resize": self.resize, "source": self.source}


def run_config_of(weights: str | os.PathLike) -> Path | None:
    """The config.yaml of the training run a weights file lies in (RUN/export/teacher.pth), if any."""
    for folder in list(Path(weights).resolve().parents)[:RUN_DEPTH]:
        if (folder / RUN_CONFIG).is_file():
            return folder / RUN_CONFIG
    return None


def trained_resolution(weights: str | os.PathLike) -> tuple[int, str] | None:
    """(global crop size, where it was read) of the run that trained `weights`, when anything records it."""
    record = read_training_record(weights)
    if record and record.get("global_crops_size"):
        return int(record["global_crops_size"]), f"the training resolution recorded in {Path(weights).name}"
    config = run_config_of(weights)
    if config is not None:
        data = OmegaConf.load(config)
        crops = OmegaConf.select(data, "crops") if isinstance(data, DictConfig) else None
        size = training_image_size(crops) if crops is not None and "global_crops_size" in crops else None
        if size:
            return size, f"the training resolution, crops.global_crops_size in {config}"
    return None


def eval_resolution(eval_cfg: EvalConfig, weights: str | os.PathLike | None) -> EvalResolution:
    """The resolution of an evaluation of `weights` with the `eval` section `eval_cfg`."""
    if eval_cfg.image_size:
        return EvalResolution(eval_cfg.image_size, eval_cfg.resize, "eval.image_size")
    trained = trained_resolution(weights) if weights else None
    if trained is not None:
        return EvalResolution(trained[0], eval_cfg.resize, trained[1])
    return EvalResolution(PROTOCOL_IMAGE_SIZE, eval_cfg.resize, "the DINO protocol's; the weights record no "
                                                                 "training resolution")


def with_image_size(eval_cfg: EvalConfig, image_size: int) -> EvalConfig:
    """A copy of the `eval` section with `image_size` set."""
    section = eval_cfg.copy()
    section.image_size = image_size
    return section


def at_training_resolution(eval_cfg: EvalConfig, crops: CropsConfig) -> EvalConfig:
    """The `eval` section of a training config, at crops.global_crops_size (the largest, with mixed
    resolution) unless eval.image_size is set."""
    return with_image_size(eval_cfg, eval_cfg.image_size or training_image_size(crops))
