"""The training sections of the config: the EMA teacher, the DINO / iBOT / Gram objectives and heads,
the optimiser and the run (`teacher.*`, `dino.*`, `ibot.*`, `gram.*`, `optim.*`, `train.*`, named as in the
DINOv2/DINOv3 reference configs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from dinoscale.data.config import DataSourceConfig
from dinoscale.utils.knobs import knob


@dataclass
class TeacherConfig:
    momentum_teacher: float = knob(0.992, "EMA momentum at the start", min=0.0, max=1.0)
    final_momentum_teacher: float = knob(1.0, "EMA momentum at the end (cosine schedule)", min=0.0, max=1.0)
    warmup_teacher_temp: float = knob(0.04, "teacher temperature at the start of its warm-up", min=0.0)
    teacher_temp: float = knob(0.07, "teacher temperature after warm-up", min=0.0)
    warmup_teacher_temp_epochs: float = knob(30, "epochs of linear teacher-temperature warm-up", min=0)


@dataclass
class DinoConfig:
    loss_weight: float = knob(1.0, "weight of the DINO loss", min=0.0)
    head_n_prototypes: int = knob(65536, "prototypes K of the DINO head", min=1)
    head_bottleneck_dim: int = knob(256, "bottleneck width of the DINO head", min=1)
    head_nlayers: int = knob(3, "MLP layers of the DINO head", min=1)
    head_hidden_dim: int = knob(2048, "hidden width of the DINO head", min=1)
    student_temp: float = knob(0.1, "student softmax temperature", min=0.0)
    center_momentum: float = knob(0.9, "EMA momentum of the centre (centering only)", min=0.0, max=1.0)
    global_ignore_diagonal: bool = knob(True, "skip student/teacher pairs of the same global view")
    koleo_loss_weight: float = knob(0.1, "weight of the KoLeo regulariser", min=0.0)
    koleo_loss_distributed: bool = knob(False, "DINOv3: KoLeo over groups of ranks")
    koleo_distributed_replicas: int = knob(0, "ranks per KoLeo group (0: all ranks)", min=0)


@dataclass
class IbotConfig:
    loss_weight: float = knob(1.0, "weight of the iBOT loss", min=0.0)
    mask_sample_probability: float = knob(0.5, "fraction of images that get a mask", min=0.0, max=1.0)
    mask_ratio_min_max: List[float] = knob([0.1, 0.5], "range of the per-image masked fraction")
    mask_min_num_patches: int = knob(4, "smallest mask block in patches", min=1)
    mask_min_aspect: float = knob(0.3, "smallest block aspect ratio (largest is its inverse)", min=0.0)
    separate_head: bool = knob(True, "iBOT gets its own head (DINOv2 recipe) instead of sharing the DINO head")
    head_n_prototypes: int = knob(65536, "prototypes of the iBOT head", min=1)
    head_bottleneck_dim: int = knob(256, "bottleneck width of the iBOT head", min=1)
    head_nlayers: int = knob(3, "MLP layers of the iBOT head", min=1)
    head_hidden_dim: int = knob(2048, "hidden width of the iBOT head", min=1)


@dataclass
class GramConfig:
    use_loss: bool = knob(False, "enable Gram anchoring (DINOv3)")
    loss_weight: float = knob(1.0, "weight of the Gram loss", min=0.0)
    it_first_update: int = knob(0, "iteration at which the Gram teacher is first taken from the EMA teacher", min=0)
    update_frequency: int = knob(10000, "iterations between Gram-teacher refreshes", min=1)
    max_updates: Optional[int] = knob(None, "stop refreshing after this many updates")
    normalized: bool = knob(True, "L2-normalise patch features before the Gram matrix")
    img_level: bool = knob(True, "one Gram matrix per image, as DINOv3's Gram-anchoring recipe (false: one over all "
                                 "patches of a rank's batch, the reference code's default: quadratic in the batch "
                                 "and dependent on how it is split over ranks)")
    remove_neg: bool = knob(False, "clamp negative similarities of both matrices to 0")
    remove_only_teacher_neg: bool = knob(False, "clamp only the teacher's negative similarities")
    global_teacher_resize_method: str = knob("bicubic", "how Gram-teacher features are resized to the student grid",
                                             choices=["bicubic", "bilinear", "nearest"])
    global_teacher_resize_antialias: bool = knob(False, "antialias when resizing Gram-teacher features")


@dataclass
class OptimConfig:
    epochs: int = knob(100, "training length in epochs of OFFICIAL_EPOCH_LENGTH iterations (of "
                                       "train.iterations / epochs when train.iterations is set)", min=1)
    base_lr: float = knob(0.004, "learning rate for a batch of 1024 (scaled by scaling_rule)", min=0.0)
    lr: float = knob(0.0, "peak learning rate; 0 means base_lr scaled by scaling_rule", min=0.0)
    scaling_rule: str = knob("sqrt_wrt_1024", "how base_lr scales with the global batch",
                             choices=["sqrt_wrt_1024", "linear_wrt_256", "none"])
    warmup_epochs: float = knob(10, "epochs of linear learning-rate warm-up", min=0)
    min_lr: float = knob(1.0e-6, "final learning rate", min=0.0)
    schedule: str = knob("cosine", "cosine decay (DINOv2) or constant after warm-up (DINOv3)",
                         choices=["cosine", "constant_after_warmup"])
    weight_decay: float = knob(0.04, "weight decay at the start", min=0.0)
    weight_decay_end: float = knob(0.4, "weight decay at the end (cosine)", min=0.0)
    clip_grad: float = knob(3.0, "gradient-norm clip (0 disables)", min=0.0)
    freeze_last_layer_epochs: float = knob(1, "epochs during which the prototype layers get no update", min=0)
    patch_embed_lr_mult: float = knob(0.2, "learning-rate multiplier of the patch embedding", min=0.0)
    layerwise_decay: float = knob(0.9, "layer-wise learning-rate decay (1 disables)", min=0.0, max=1.0)
    adamw_beta1: float = knob(0.9, "AdamW beta1", min=0.0, max=1.0)
    adamw_beta2: float = knob(0.999, "AdamW beta2", min=0.0, max=1.0)


@dataclass
class TrainConfig:
    dataset_path: str = knob("", "training images: curated shards, an image folder, a path list or tar shards")
    sources: List[DataSourceConfig] = knob([], "several weighted sources instead of dataset_path")
    homogeneous_batch_fraction: float = knob(0.0, "DINOv3: fraction of batches drawn from one source only",
                                             min=0.0, max=1.0)
    output_dir: str = knob("runs/train", "run directory (checkpoints, metrics, config)")
    batch_size_per_gpu: int = knob(64, "images per rank per step", min=1)
    OFFICIAL_EPOCH_LENGTH: int = knob(1250, "iterations per epoch (as in the reference; unused when "
                                                       "iterations is set)", min=1)
    iterations: Optional[int] = knob(None, "run length in iterations: every length in epochs (optim.epochs and "
                                           "the warm-ups and freeze) is scaled to it, an epoch being iterations / "
                                           "optim.epochs iterations (null: optim.epochs x OFFICIAL_EPOCH_LENGTH)",
                                     min=1)
    max_iterations: Optional[int] = knob(None, "stop after this many iterations, wherever the schedule is "
                                               "(warns; to shorten the schedule too, set iterations)", min=1)
    centering: str = knob("sinkhorn_knopp", "teacher normalisation: EMA centring (DINO), Sinkhorn-Knopp (DINOv2/v3), or "
                                            "none (plain softmax, which collapses: an ablation)",
                          choices=["centering", "sinkhorn_knopp", "none"])
    num_workers: int = knob(2, "data-loader workers per rank", min=0)
    shuffle_buffer: int = knob(2000, "streaming shuffle buffer (images)", min=0)
    checkpoint_period_iterations: int = knob(1000, "save a checkpoint every N iterations", min=1)
    keep_last_checkpoints: int = knob(3, "checkpoints to keep", min=1)
    mixed_precision: str = knob("auto", "bf16 compute with fp32 master weights where the hardware has it",
                                choices=["auto", "bf16", "fp32"])
    activation_checkpointing: str = knob("none", "recompute blocks in backward", choices=["none", "selective", "full"])
    compile: bool = knob(False, "torch.compile each transformer block")
    peak_flops: Optional[float] = knob(None, "matmul FLOP/s of one rank, the MFU denominator (null: measured at "
                                             "start-up, best of several short runs)", min=0.0)
    log_period_iterations: int = knob(10, "log a metrics line every N iterations", min=1)
