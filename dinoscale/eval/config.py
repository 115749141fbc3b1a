"""The `eval.*` section of the config: evaluation datasets, k-NN, linear probe, pictures, and the
online k-NN during training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from dinoscale.utils.knobs import knob


@dataclass
class EvalConfig:
    train_dataset: str = knob("", "labelled images for the k-NN bank / probe training (class sub-folders)")
    val_dataset: str = knob("", "labelled images to evaluate on")
    image_size: int = knob(224, "evaluation resolution", min=1)
    batch_size: int = knob(128, "images per forward", min=1)
    num_workers: int = knob(2, "data-loader workers decoding evaluation images", min=0)
    precision: str = knob("auto", "bf16 autocast where the hardware has it (auto), always, or never",
                          choices=["auto", "bf16", "fp32"])
    knn_features: str = knob("cls", "features of the k-NN", choices=["cls", "patch_mean", "cls_patchmean"])
    knn_k: List[int] = knob([10, 20, 100, 200], "k values of the weighted k-NN")
    knn_temperature: float = knob(0.07, "temperature of the k-NN vote weights exp(sim/T)", min=0.0)
    knn_query_chunk_size: int = knob(256, "k-NN queries per similarity block", min=1)
    knn_bank_chunk_size: int = knob(65536, "k-NN bank items per similarity block (memory ~ queries x bank)", min=1)
    linear_features: str = knob("cls_patchmean", "features of the linear probe (DINOv2: CLS + mean patch token)",
                                choices=["cls", "patch_mean", "cls_patchmean"])
    linear_lrs: List[float] = knob([1e-4, 1e-3, 1e-2, 1e-1], "learning-rate grid of the linear probe")
    linear_weight_decays: List[float] = knob([0.0, 1e-4, 1e-2], "weight-decay grid of the linear probe")
    linear_epochs: int = knob(100, "epochs of linear-probe training", min=1)
    linear_batch_size: int = knob(256, "features per linear-probe SGD step", min=1)
    linear_val_fraction: float = knob(0.1, "share of each training class held out to choose the grid point",
                                      min=0.0, max=1.0)
    visualize_n_images: int = knob(6, "images in the PCA / attention montages", min=1)
    pca_foreground_threshold: float = knob(0.0, "foreground: patches whose first principal component lies "
                                                "above this many standard deviations")
    online_knn_period_iterations: int = knob(0, "k-NN on eval datasets every N training iterations (0: off)", min=0)
