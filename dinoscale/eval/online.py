"""Evaluation during training: the trainer hands over a plain copy of the EMA teacher's backbone
and logs the weighted k-NN accuracy on the labelled `eval.train_dataset` / `eval.val_dataset`
every `eval.online_knn_period_iterations`, and the dense probes' scores on the `eval.dense.*`
datasets every `eval.online_dense_period_iterations` (the images shared out over the ranks)."""

from __future__ import annotations

import torch
from torch import nn

from dinoscale.eval.config import EvalConfig
from dinoscale.eval.dense import online_dense
from dinoscale.eval.dense_data import open_dense_datasets
from dinoscale.eval.evaluate import evaluate_knn, knn_metrics, open_labelled
from dinoscale.eval.features import LabelledImages
from dinoscale.utils.logging import get_logger

log = get_logger(__name__)


def online_knn(model: nn.Module, train_images: LabelledImages, val_images: LabelledImages, cfg: EvalConfig,
               device: torch.device | None = None) -> dict[str, float]:
    """The `knn_top1_k*` / `knn_top5_k*` metrics of `model`; its train/eval mode is restored afterwards."""
    return knn_metrics(evaluate_knn(model, train_images, val_images, cfg, device))


def _every(period: int, iteration: int) -> bool:
    return bool(period) and (iteration + 1) % period == 0


class OnlineEvaluation:
    """What the trainer evaluates, and when; the datasets are opened once, at the start.
    `cfg`: the `eval` section, at the resolution to evaluate at (`eval.resolution.at_training_resolution`)."""

    def __init__(self, cfg: EvalConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.knn_period, self.dense_period = cfg.online_knn_period_iterations, cfg.online_dense_period_iterations
        self.labelled = ((open_labelled(cfg.train_dataset, "train"), open_labelled(cfg.val_dataset, "val"))
                         if self.knn_period else None)
        self.dense_sets = open_dense_datasets(cfg.dense) if self.dense_period else None

    def due(self, iteration: int) -> bool:
        return _every(self.knn_period, iteration) or _every(self.dense_period, iteration)

    def __call__(self, backbone: nn.Module, iteration: int) -> dict[str, float]:
        """The metrics due at `iteration` (k-NN, dense probes or both) of the teacher's `backbone`."""
        metrics: dict[str, float] = {}
        if _every(self.knn_period, iteration):
            metrics.update(online_knn(backbone, *self.labelled, self.cfg, self.device))
            log.info("it %d: teacher k-NN top-1 %s", iteration,
                     {k: round(v, 2) for k, v in metrics.items() if k.startswith("knn_top1")})
        if _every(self.dense_period, iteration):
            dense = online_dense(backbone, self.dense_sets, self.cfg, self.device)
            metrics.update(dense)
            log.info("it %d: teacher dense probes %s", iteration, {k: round(v, 3) for k, v in dense.items()})
        return metrics
