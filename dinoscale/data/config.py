"""The data sections of the config: multi-crop augmentation (`crops.*`, read by
`dinoscale.data.augment`) and weighted training sources (`train.sources`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List

from dinoscale.utils.knobs import knob


@dataclass
class CropsConfig:
    global_crops_scale: List[float] = knob([0.32, 1.0], "area range of the global RandomResizedCrop")
    local_crops_number: int = knob(8, "number of local crops", min=0)
    local_crops_scale: List[float] = knob([0.05, 0.32], "area range of the local RandomResizedCrop")
    # int or list (OmegaConf has no int-or-list type); dinoscale.data.crop_sizes checks them
    global_crops_size: Any = knob(224, "global crop side in pixels, or a list of sides, one per crop-size triple "
                                       "(DINOv3's mixed resolution)")
    local_crops_size: Any = knob(96, "local crop side in pixels, or a list, one per crop-size triple")
    gram_teacher_crops_size: Any = knob(None, "DINOv3: side of the extra global crop for the Gram teacher (null: "
                                              "none), or a list, one per crop-size triple")
    global_local_crop_pairs_ratios: Any = knob(1.0, "probability of each (global, local, Gram-teacher) crop-size "
                                                    "triple: a list when the sizes are lists, summing to 1; each "
                                                    "step draws one triple for the whole global batch")
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


@dataclass
class DataSourceConfig:
    path: str = knob("", "image folder, text file of paths, or webdataset shards (dir or brace pattern)")
    weight: float = knob(1.0, "relative sampling weight among sources", min=0.0)
