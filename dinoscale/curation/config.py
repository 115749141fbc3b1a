"""The `curation.*` section of the config: one sub-section per curation stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from dinoscale.utils.knobs import knob


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
