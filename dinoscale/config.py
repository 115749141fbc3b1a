"""The typed configuration of dinoscale.

One dataclass schema, loaded with OmegaConf structured configs, so that a misspelt key or a
wrong type fails at load time. Section and knob names follow the DINOv2/DINOv3 reference
configs (`student`, `teacher`, `dino`, `ibot`, `gram`, `crops`, `optim`, `train`) so a user
moving from the reference code recognises them; `data`, `curation` and `eval` are dinoscale's.

Every knob is declared with `knob(default, help=..., choices=..., min=..., max=...)`; the
metadata drives validation and the configuration reference in the README.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from dinoscale.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "configs"


def knob(default: Any, help: str, *, choices: Sequence[Any] | None = None, min: float | None = None,
         max: float | None = None) -> Any:
    """A config field with its documentation and allowed values."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- model
@dataclass
class StudentConfig:
    """The backbone. `arch` names a preset; a field left null takes the preset's value (dinoscale/models/presets.py)."""

    arch: str = knob("vit_small", "backbone preset (see `dinoscale models`)")
    patch_size: int = knob(16, "patch size in pixels", min=1)
    img_size: int = knob(224, "native resolution the position embedding is made for", min=1)
    embed_dim: Optional[int] = knob(None, "override the preset's width", min=1)
    depth: Optional[int] = knob(None, "override the preset's number of blocks", min=1)
    num_heads: Optional[int] = knob(None, "override the preset's number of attention heads", min=1)
    ffn_layer: Optional[str] = knob(None, "feed-forward block (null: the preset's)",
                                    choices=["mlp", "swiglu", "swiglu32", "swiglu64", "swiglu128"])
    ffn_ratio: Optional[float] = knob(None, "hidden width of the feed-forward block / embed_dim (null: the preset's)",
                                      min=0.0)
    n_storage_tokens: Optional[int] = knob(None, "register tokens, DINOv2 `num_register_tokens` (null: the preset's)",
                                           min=0)
    pos_embed_type: Optional[str] = knob(None, "absolute learned embedding (DINOv2) or 2-D axial RoPE (DINOv3); "
                                               "null: the preset's", choices=["learned", "rope"])
    pos_embed_rope_base: float = knob(100.0, "RoPE period base", min=0.0)
    pos_embed_rope_min_period: Optional[float] = knob(None, "RoPE minimum period (instead of base)")
    pos_embed_rope_max_period: Optional[float] = knob(None, "RoPE maximum period (instead of base)")
    pos_embed_rope_normalize_coords: str = knob("separate", "how patch coordinates are normalised to [-1, 1]",
                                                choices=["min", "max", "separate"])
    pos_embed_rope_shift_coords: Optional[float] = knob(None, "training-time random shift of RoPE coordinates "
                                                              "(null: the preset's; 0 disables)")
    pos_embed_rope_jitter_coords: Optional[float] = knob(None, "training-time random log-scale jitter per axis "
                                                               "(null: the preset's; 1 disables)")
    pos_embed_rope_rescale_coords: Optional[float] = knob(None, "training-time random log-scale rescale "
                                                                "(null: the preset's; 1 disables)")
    interpolate_offset: Optional[float] = knob(None, "offset of the bicubic position-embedding interpolation, "
                                                     "DINOv2 (null: the preset's)")
    interpolate_antialias: Optional[bool] = knob(None, "antialias when interpolating the position embedding "
                                                       "(null: the preset's)")
    norm_layer: Optional[str] = knob(None, "normalisation layer: layernorm (eps 1e-6, DINOv2), layernormbf16 "
                                           "(eps 1e-5, DINOv3) or rmsnorm (null: the preset's)",
                                     choices=["layernorm", "layernormbf16", "rmsnorm"])
    layerscale: Optional[float] = knob(None, "LayerScale init value (null: the preset's; 0 disables)", min=0.0)
    drop_path_rate: float = knob(0.0, "stochastic depth rate", min=0.0, max=1.0)
    drop_path_uniform: bool = knob(True, "same drop-path rate in every block (else linear ramp)")
    qkv_bias: Optional[bool] = knob(None, "bias on the qkv projection (null: the preset's)")
    proj_bias: bool = knob(True, "bias on the attention output projection")
    ffn_bias: bool = knob(True, "biases in the feed-forward block")
    mask_k_bias: Optional[bool] = knob(None, "DINOv3: zero the key part of the qkv bias (null: the preset's)")
    untie_cls_and_patch_norms: Optional[bool] = knob(None, "DINOv3: a separate final norm for CLS and storage "
                                                           "tokens (null: the preset's)")
    untie_global_and_local_cls_norm: Optional[bool] = knob(None, "DINOv3: a separate final CLS norm for local "
                                                                 "crops in training (null: the preset's)")
    attn_backend: str = knob("auto", "attention kernel", choices=["auto", "xformers", "sdpa", "math"])
    pretrained_weights: str = knob("", "official DINOv2/DINOv3 or dinoscale backbone file to start from")


@dataclass
class TeacherConfig:
    momentum_teacher: float = knob(0.992, "EMA momentum at the start", min=0.0, max=1.0)
    final_momentum_teacher: float = knob(1.0, "EMA momentum at the end (cosine schedule)", min=0.0, max=1.0)
    warmup_teacher_temp: float = knob(0.04, "teacher temperature at the start of its warm-up", min=0.0)
    teacher_temp: float = knob(0.07, "teacher temperature after warm-up", min=0.0)
    warmup_teacher_temp_epochs: float = knob(30, "epochs of linear teacher-temperature warm-up", min=0)


# ----------------------------------------------------------------------------- objectives
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
class CropsConfig:
    global_crops_scale: List[float] = knob([0.32, 1.0], "area range of the global RandomResizedCrop")
    local_crops_number: int = knob(8, "number of local crops", min=0)
    local_crops_scale: List[float] = knob([0.05, 0.32], "area range of the local RandomResizedCrop")
    global_crops_size: int = knob(224, "global crop side in pixels", min=1)
    local_crops_size: int = knob(96, "local crop side in pixels", min=1)
    gram_teacher_crops_size: Optional[int] = knob(None, "DINOv3: extra global crop for the Gram teacher")
    gram_teacher_no_distortions: bool = knob(False, "Gram-teacher crops without photometric distortions")
    localcrops_subset_of_globalcrops: bool = knob(False, "DINOv3: local crops are taken inside the global crops")
    share_color_jitter: bool = knob(False, "DINOv3: one colour jitter for all crops of an image")
    horizontal_flips: bool = knob(True, "random horizontal flips")
    color_jitter_probability: float = knob(0.8, "probability of the colour jitter (DINOv2: 0.8)", min=0.0, max=1.0)
    color_jitter_brightness: float = knob(0.4, "brightness jitter strength (DINOv2: 0.4)", min=0.0)
    color_jitter_contrast: float = knob(0.4, "contrast jitter strength (DINOv2: 0.4)", min=0.0)
    color_jitter_saturation: float = knob(0.2, "saturation jitter strength (DINOv2: 0.2)", min=0.0)
    color_jitter_hue: float = knob(0.1, "hue jitter strength, 0.5 = any hue (DINOv2: 0.1)", min=0.0, max=0.5)
    grayscale_probability: float = knob(0.2, "probability of converting a crop to grayscale (DINOv2: 0.2)",
                                        min=0.0, max=1.0)


# ----------------------------------------------------------------------------- optimisation
@dataclass
class OptimConfig:
    epochs: int = knob(100, "training length in epochs of OFFICIAL_EPOCH_LENGTH iterations", min=1)
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
class DataSourceConfig:
    path: str = knob("", "image folder, text file of paths, or webdataset shards (dir or brace pattern)")
    weight: float = knob(1.0, "relative sampling weight among sources", min=0.0)


@dataclass
class TrainConfig:
    dataset_path: str = knob("", "training images: curated shards, an image folder, a path list or tar shards")
    sources: List[DataSourceConfig] = knob([], "several weighted sources instead of dataset_path")
    homogeneous_batch_fraction: float = knob(0.0, "DINOv3: fraction of batches drawn from one source only",
                                             min=0.0, max=1.0)
    output_dir: str = knob("runs/train", "run directory (checkpoints, metrics, config)")
    batch_size_per_gpu: int = knob(64, "images per rank per step", min=1)
    OFFICIAL_EPOCH_LENGTH: int = knob(1250, "iterations per epoch (as in the reference)", min=1)
    max_iterations: Optional[int] = knob(None, "stop early after this many iterations")
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


# ----------------------------------------------------------------------------- curation
@dataclass
class EmbedConfig:
    backbone: str = knob("", "weights file for load_backbone, a dinoscale run directory (its export/teacher.pth), "
                             "or `pixels`: downsampled ImageNet-normalised pixels, a baseline that needs no model")
    arch: Optional[str] = knob(None, "preset to load the weights into (auto-detected when null)")
    image_size: int = knob(224, "images are resized and centre-cropped to this side", min=1)
    batch_size: int = knob(64, "images per forward", min=1)
    features: str = knob("cls", "which features to embed", choices=["cls", "cls_patchmean"])
    embeddings_file: str = knob("", "start from precomputed N x D embeddings (.npy) instead of images")
    dtype: str = knob("float16", "how embeddings are stored: float16 (half the disk and memory of float32) or "
                                 "float32", choices=["float16", "float32"])
    num_workers: int = knob(2, "data-loader processes decoding images", min=0)
    precision: str = knob("auto", "bf16 autocast where the hardware has it (auto), always, or never",
                          choices=["auto", "bf16", "fp32"])
    copy_detection: str = knob("", "a second embedding used only by dedup, as DINOv2 used a copy-detection model: "
                                   "a TorchScript copy-detection model (e.g. SSCD) or backbone weights file, "
                                   "`descriptor` (model-free: colour layout, gradient orientations and colour "
                                   "histogram), `pdq` (Meta's PDQ hash) or `pixels` (empty: dedup uses the main "
                                   "embeddings)")
    copy_detection_image_size: int = knob(32, "side of the images the copy-detection embedding sees (32 suits "
                                              "`descriptor`, 8 `pixels`)", min=1)


@dataclass
class DedupConfig:
    exact: bool = knob(True, "drop exact duplicates by content hash")
    k: int = knob(64, "neighbours in the k-NN graph", min=1)
    threshold: float = knob(0.6, "cosine above which an image is a near duplicate of the kept image of its group "
                                 "(DINOv2: 0.6 with SSCD; model-free embeddings are checked against the range "
                                 "measured on real images)", min=-1.0, max=1.0)
    decontamination_sets: List[str] = knob([], "embeddings (.npy) or pools whose near duplicates are dropped")
    decontamination_threshold: float = knob(0.45, "cosine for decontamination", min=-1.0, max=1.0)
    ivf_min_size: int = knob(250_000, "from this many images, search an approximate inverted-file index "
                             "instead of an exact one", min=1)
    nprobe: int = knob(32, "inverted lists scanned per query of the approximate index", min=1)


@dataclass
class KMeansConfig:
    n_clusters: List[int] = knob([100, 10], "clusters per level, finest first")
    n_resampling_steps: List[int] = knob([10, 10], "resampling steps per level")
    sample_size: List[int] = knob([10, 5], "points per cluster kept in each resampling step (1: no resampling)")
    resampling_strategy: str = knob("closest", "which points of a cluster re-fit the centroids in a resampling step",
                                    choices=["closest", "random"])
    n_iter: int = knob(20, "k-means iterations per fit", min=1)
    init: str = knob("kmeans++", "seeding of every k-means fit: greedy k-means++ as Vo et al. (what makes "
                     "resampling rebalance) or random points (no rebalancing)", choices=["kmeans++", "random"])
    seeding_points_per_cluster: int = knob(10, "k-means++ seeds a fit on at most this many points per cluster (a "
                                               "random subset of larger fits, such as a level's first fit); at "
                                               "least sample_size keeps resampling fits seeding on all their points",
                                           min=1)
    n_split: int = knob(1, "split each first-level cluster into this many by k-means on its members "
                           "(level 1 ends with n_clusters[0] * n_split clusters)", min=1)
    train_sample: Optional[int] = knob(None, "fit level 1 on this many points and assign the rest", min=1)
    dtype: str = knob("float32", "precision of centroid means and stored centroids",
                      choices=["float32", "float64"])
    lloyd_precision: str = knob("bfloat16", "nearest-centroid searches inside the Lloyd iterations of fits above 64 "
                                "dimensions: bfloat16 (one bf16 GEMM, where the CPU has native bf16 and faiss no "
                                "GPU; near ties may go either way) or float32 (exact); every level's final "
                                "assignment is float32", choices=["bfloat16", "float32"])


@dataclass
class SamplingConfig:
    target_size: int = knob(1000, "images in the curated set", min=1)
    strategy: str = knob("random", "which points a leaf cluster gives", choices=["random", "closest"])
    allow_repeats: bool = knob(False, "repeat images when the pool is smaller than the target")


@dataclass
class RetrievalConfig:
    seed_sets: List[str] = knob([], "embeddings (.npy) or pools of seed images")
    k: int = knob(4, "nearest pool images per seed image", min=1)
    cluster_based: bool = knob(False, "for small seed sets: take whole clusters holding seeds")
    min_seeds_per_cluster: int = knob(3, "cluster-based: clusters with more seeds than this contribute", min=0)
    images_per_cluster: int = knob(1000, "cluster-based: images taken per selected cluster", min=1)
    ivf_min_size: int = knob(250_000, "from this many pool images, search an approximate inverted-file index "
                             "instead of an exact one", min=1)
    nprobe: int = knob(32, "inverted lists scanned per query of the approximate index", min=1)


@dataclass
class ShardsConfig:
    shard_size: int = knob(1000, "images per webdataset tar shard", min=1)
    image_format: str = knob("jpg", "encoding inside the shards (images already in it keep their bytes)",
                             choices=["jpg", "png", "webp"])
    quality: int = knob(95, "quality of images re-encoded to jpg or webp", min=1, max=100)


@dataclass
class CurationConfig:
    pool: str = knob("", "the uncurated images: an image folder, a text file of paths, or tar shards")
    output_dir: str = knob("runs/curate", "one sub-folder per stage")
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    report_examples: int = knob(8, "report: duplicate groups and top-level clusters shown, and images per cluster",
                                min=0)
    distributed_timeout_s: int = knob(1800, "under torchrun or a multi-task SLURM job: the longest a rank waits in "
                                            "a collective for the others before the job stops", min=1)


# ----------------------------------------------------------------------------- evaluation
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


@dataclass
class DemoConfig:
    pool_images: int = knob(3000, "images in the synthetic uncurated pool", min=50)
    image_size: int = knob(64, "side of the synthetic images", min=16)
    eval_per_class: int = knob(40, "labelled images per class in each evaluation split", min=2)
    embedder_epochs: int = knob(10, "epochs (of train.OFFICIAL_EPOCH_LENGTH iterations) of the first training round, "
                                    "on the raw pool: the curation embedder", min=1)
    continue_from_embedder: bool = knob(True, "start the final round from the embedder's backbone (fresh heads) "
                                              "instead of from scratch")
    gram_fraction: float = knob(0.2, "share of the final training run with Gram anchoring", min=0.0, max=1.0)
    pictures: int = knob(6, "images in the PCA and attention montages", min=1)


@dataclass
class Config:
    seed: int = knob(0, "seed of every random choice")
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    curation: CurationConfig = field(default_factory=CurationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


# ----------------------------------------------------------------------------- loading
def list_presets() -> list[str]:
    return sorted(str(p.relative_to(PRESET_DIR).with_suffix("")) for p in PRESET_DIR.rglob("*.yaml"))


def _resolve_preset(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    names = list_presets()
    hint = difflib.get_close_matches(name_or_path, names, n=1)
    suggestion = f"did you mean '{hint[0]}'? " if hint else ""
    raise ConfigError(f"no config file or preset named '{name_or_path}'; {suggestion}presets: {', '.join(names)}")


def _valid_keys(node: Any) -> list[str]:
    if dataclasses.is_dataclass(node):
        return [f.name for f in dataclasses.fields(node)]
    return []


def _schema_at(path: Sequence[str]) -> Any:
    """The dataclass type found at a dotted key path of the schema (None past a leaf)."""
    node: Any = Config
    for part in path:
        if not dataclasses.is_dataclass(node):
            return None
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return None
        node = fields[part].type
        node = _resolve_type(node)
    return node


def _resolve_type(tp: Any) -> Any:
    if isinstance(tp, str):
        return globals().get(tp.split("[")[0], tp)
    return tp


def _unknown_key_error(full_key: str, source: str) -> ConfigError:
    parts = full_key.split(".")
    # walk to the deepest valid parent
    parent_parts: list[str] = []
    for part in parts[:-1]:
        if _schema_at(parent_parts + [part]) is None or not dataclasses.is_dataclass(_schema_at(parent_parts + [part])):
            break
        parent_parts.append(part)
    bad = parts[len(parent_parts)]
    candidates = _valid_keys(_schema_at(parent_parts))
    hint = difflib.get_close_matches(bad, candidates, n=1, cutoff=0.5)
    prefix = ".".join(parent_parts + [bad])
    msg = f"unknown config key '{prefix}' (from {source})"
    if hint:
        msg += f"; did you mean '{'.'.join(parent_parts + [hint[0]])}'?"
    elif candidates:
        msg += f"; valid keys here: {', '.join(candidates)}"
    return ConfigError(msg)


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as err:
        raise _unknown_key_error(str(err.full_key), source) from None
    except ValidationError as err:
        f = _field_of(str(err.full_key))
        expected = getattr(_resolve_type(f.type), "__name__", str(f.type)) if f else "its declared type"
        raise ConfigError(
            f"config key '{err.full_key}' (from {source}) got {err.value!r}, which is not a valid {expected}"
        ) from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config (from {source}): {err}") from None


def _field_of(dotted: str) -> dataclasses.Field | None:
    parts = dotted.split(".")
    parent = _schema_at(parts[:-1])
    if not dataclasses.is_dataclass(parent):
        return None
    return {f.name: f for f in dataclasses.fields(parent)}.get(parts[-1])


def _check_values(node: Any, cfg: DictConfig, prefix: str = "") -> None:
    """Check choices and numeric ranges declared with `knob`."""
    for f in dataclasses.fields(node):
        key = f"{prefix}{f.name}"
        value = cfg[f.name]
        ftype = _resolve_type(f.type)
        if dataclasses.is_dataclass(ftype):
            _check_values(ftype, value, key + ".")
            continue
        choices, lo, hi = f.metadata.get("choices"), f.metadata.get("min"), f.metadata.get("max")
        if value is None:
            continue
        if choices is not None and value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            msg = f"config key '{key}' = {value!r} is not allowed; choose one of {', '.join(map(str, choices))}"
            raise ConfigError(msg + (f" (did you mean '{hint[0]}'?)" if hint else ""))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
                raise ConfigError(f"config key '{key}' = {value!r} is out of range; allowed: {bounds}")


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {err}") from None


def _merge_preset(cfg: DictConfig, path: Path, including: tuple[Path, ...] = ()) -> DictConfig:
    """Merge the YAML file at `path` into `cfg`, after the presets named in its `defaults:` list
    (Hydra's convention: a preset builds on others and overrides what it repeats)."""
    if path.resolve() in including:
        chain = " -> ".join(p.name for p in (*including, path.resolve()))
        raise ConfigError(f"presets include each other in a cycle: {chain}")
    data = OmegaConf.load(path)
    bases = data.pop("defaults", [])
    if isinstance(bases, str) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"'defaults' in {path.name} must be a list of preset names, e.g. [train/small_pool]")
    for base in bases:
        relative = path.parent / base
        base_path = relative if relative.suffix in (".yaml", ".yml") and relative.exists() else _resolve_preset(base)
        cfg = _merge_preset(cfg, base_path, (*including, path.resolve()))
    return _merge(cfg, data, path.name)


def load_config(preset: str | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Schema defaults <- preset or YAML file <- `key.sub=value` overrides, then validated."""
    cfg = OmegaConf.structured(Config)
    if preset:
        cfg = _merge_preset(cfg, _resolve_preset(preset))
    if overrides:
        cfg = _merge(cfg, _parse_overrides(overrides), "command line")
    _check_values(Config, cfg)
    return cfg


def config_hash(cfg: Any) -> str:
    """A short stable hash of a config section (or any JSON-able value)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    blob = json.dumps(cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def reference_markdown() -> str:
    """The configuration reference, generated from the schema (used by the README)."""
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|"]

    def walk(node: Any, prefix: str) -> None:
        instance = node()
        for f in dataclasses.fields(node):
            ftype = _resolve_type(f.type)
            if dataclasses.is_dataclass(ftype):
                walk(ftype, f"{prefix}{f.name}.")
                continue
            meta = f.metadata
            allowed = ", ".join(map(str, meta["choices"])) if meta.get("choices") else ""
            if meta.get("min") is not None or meta.get("max") is not None:
                allowed = f"[{meta.get('min', '')}, {meta.get('max', '')}]".replace("None", "")
            default = json.dumps(getattr(instance, f.name), default=lambda o: dataclasses.asdict(o))
            lines.append(f"| `{prefix}{f.name}` | `{default}` | {allowed} | {meta.get('help', '')} |")

    walk(Config, "")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
