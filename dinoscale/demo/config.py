"""The `demo.*` section of the config."""

from __future__ import annotations

from dataclasses import dataclass

from dinoscale.utils.knobs import knob


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
