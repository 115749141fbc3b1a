"""The tiny ViT the tests share (`TINY_STUDENT`; the `tiny_backbone` fixture builds it), and the tiny
training run the trainer and SLURM tests share: that ViT on 16-px crops with the full objective
(DINO, iBOT, KoLeo, Gram), and a 60-image synthetic pool to train it on."""

from __future__ import annotations

from pathlib import Path

import yaml

from dinoscale.data.synthetic import SyntheticSpec, make_synthetic_pool

# the smallest ViT the tests build: 2 blocks, 32 wide, 2 heads, 4-px patches, 16-px images
TINY_STUDENT = {"arch": "vit_small", "embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 4, "img_size": 16}
# LayerScale 1 and no drop path: at init the CLS features then differ between images, which keeps
# KoLeo well conditioned; Gram at image level is the same for any split of the batch.
TINY = {
    "student": {**TINY_STUDENT, "drop_path_rate": 0.0, "layerscale": 1.0},
    "dino": {"head_n_prototypes": 64, "head_hidden_dim": 64, "head_bottleneck_dim": 32, "koleo_loss_distributed": True},
    "ibot": {"head_n_prototypes": 64, "head_hidden_dim": 64, "head_bottleneck_dim": 32},
    "gram": {"use_loss": True, "it_first_update": 3, "update_frequency": 2, "img_level": True},
    "crops": {"global_crops_size": 16, "local_crops_size": 8, "local_crops_number": 2},
    "optim": {"epochs": 1, "warmup_epochs": 0.2, "base_lr": 0.001},
    "teacher": {"warmup_teacher_temp_epochs": 0.2},
    "train": {"batch_size_per_gpu": 4, "OFFICIAL_EPOCH_LENGTH": 6, "num_workers": 0, "checkpoint_period_iterations": 3,
              "mixed_precision": "fp32", "log_period_iterations": 1},
}
LOSS_TERMS = ("dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss", "gram_loss", "total_loss")


def write_tiny_run(root: Path, **changes: dict) -> Path:
    """root/data (the synthetic pool and its eval splits) and root/tiny.yaml: TINY with `changes`
    merged into its sections (e.g. optim={"epochs": 2}). Returns root."""
    make_synthetic_pool(root / "data", SyntheticSpec(n_images=60, image_size=24, eval_per_class=1, n_corrupt=2))
    config = {section: {**values, **changes.get(section, {})} for section, values in TINY.items()}
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    return root
