"""Evaluation during training: every `eval.online_knn_period_iterations` the trainer hands over a
plain copy of the EMA teacher's backbone and logs the weighted k-NN accuracy on the labelled
`eval.train_dataset` / `eval.val_dataset` (the images shared out over the ranks)."""

from __future__ import annotations


import torch
from torch import nn

from dinoscale.eval.config import EvalConfig
from dinoscale.eval.evaluate import evaluate_knn, knn_metrics, open_labelled
from dinoscale.eval.features import LabelledImages


def online_knn(model: nn.Module, train_images: LabelledImages, val_images: LabelledImages, cfg: EvalConfig,
               device: torch.device | None = None) -> dict[str, float]:
    """The `knn_top1_k*` / `knn_top5_k*` metrics of `model`; its train/eval mode is restored afterwards."""
    return knn_metrics(evaluate_knn(model, train_images, val_images, cfg, device))


class OnlineEvaluation:
    """What the trainer evaluates, and when; the labelled sets are opened once, at the start."""

    def __init__(self, cfg: EvalConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.period = cfg.online_knn_period_iterations
        self.labelled = ((open_labelled(cfg.train_dataset, "train"), open_labelled(cfg.val_dataset, "val"))
                         if self.period else None)

    def due(self, iteration: int) -> bool:
        return bool(self.period) and (iteration + 1) % self.period == 0

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        return online_knn(backbone, *self.labelled, self.cfg, self.device)
