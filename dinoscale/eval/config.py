"""The `eval.*` section of the config: evaluation datasets, k-NN, linear probe, dense probes
(`eval.dense.*`), pictures, and the online evaluations during training."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from dinoscale.utils.knobs import knob


@dataclass
class DenseEvalConfig:
    """Linear segmentation and depth probes on frozen patch features (DINOv2/DINOv3 linear protocol)."""

    train_dataset: str = knob("", "images to train the dense probes on (a folder or any pool)")
    train_masks: str = knob("", "segmentation masks of the train images: PNGs with the images' relative stems")
    train_depth: str = knob("", "depth maps of the train images: 16-bit PNGs or .npy, the images' relative stems")
    val_dataset: str = knob("", "images to score the dense probes on")
    val_masks: str = knob("", "segmentation masks of the val images")
    val_depth: str = knob("", "depth maps of the val images")
    image_size: int = knob(448, "images are resized to this square side (a multiple of the patch size); "
                                "predictions are upsampled to each label map's own size", min=1)
    backbone_out_layers: str = knob("LAST", "patch tokens of the last block, or of the last four concatenated",
                                    choices=["LAST", "FOUR_LAST"])
    use_cls_token: bool = knob(False, "concatenate the CLS token to every patch token")
    use_batchnorm: bool = knob(True, "normalise each feature with its training mean and std before the linear "
                                     "layer (the reference head's BatchNorm at its running statistics)")
    num_classes: Optional[int] = knob(None, "segmentation classes (null: largest label of the train masks + 1)",
                                      min=1)
    ignore_index: int = knob(255, "mask value of unlabelled pixels (VOC: 255)", min=0)
    reduce_zero_label: bool = knob(False, "ADE20k convention: label 0 is unlabelled, the others shift down by one")
    min_depth: float = knob(0.001, "depth range of the bins; ground truth outside (min, max) is not scored", min=0.0)
    max_depth: float = knob(10.0, "upper end of the depth range (NYU: 10 m, KITTI: 80 m)", min=0.0)
    depth_normalization_constant: float = knob(1000.0, "16-bit depth PNG value / this = depth (1000: millimetres to "
                                                       "metres); .npy maps are read as they are", min=0.0)
    depth_n_bins: int = knob(256, "depth bins the linear layer predicts a distribution over (1: plain "
                                  "regression)", min=1)
    bins_strategy: str = knob("linear", "spacing of the depth bins", choices=["linear", "log"])
    norm_strategy: str = knob("linear", "bin weights from the outputs: relu + 0.1 normalised (AdaBins), softmax "
                                        "or sigmoid normalised", choices=["linear", "softmax", "sigmoid"])
    lrs: List[float] = knob([1e-2, 1e-1, 1.0], "learning-rate grid of the dense probes")
    weight_decays: List[float] = knob([0.0, 1e-3], "weight-decay grid of the dense probes")
    epochs: int = knob(20, "epochs of dense-probe training", min=1)
    batch_size: int = knob(16, "images per dense-probe SGD step", min=1)
    val_fraction: float = knob(0.1, "share of the train images held out to choose the grid point", min=0.0, max=1.0)
    skip_bad_targets: bool = knob(False, "leave out images whose target is missing, of another size or has labels "
                                         "above num_classes, reporting their counts (false: stop with an error)")
    n_pictures: int = knob(4, "val images drawn with their predicted and true masks and depth", min=0)


@dataclass
class EvalConfig:
    train_dataset: str = knob("", "labelled images for the k-NN bank / probe training (class sub-folders, or a CSV "
                                  "file with path and label columns)")
    val_dataset: str = knob("", "labelled images to evaluate on")
    image_size: Optional[int] = knob(None, "evaluation resolution (null: the resolution the weights were trained at, "
                                           "as their export or run records it; 224, the DINO protocol's, for "
                                           "weights that do not say)", min=1)
    resize: str = knob("center_crop", "center_crop: resize the short side to 256/224 of image_size and keep the "
                                      "centre (DINO protocol); whole_image: resize the whole image to image_size x "
                                      "image_size (no border lost)", choices=["center_crop", "whole_image"])
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
    online_dense_period_iterations: int = knob(0, "dense probes on eval.dense datasets every N training "
                                                  "iterations (0: off)", min=0)
    dense: DenseEvalConfig = field(default_factory=DenseEvalConfig)
