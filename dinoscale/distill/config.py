"""The `distill` section: DINOv3's multi-student distillation (its `distillation` and
`multidistillation` sections in one): a frozen teacher, the global batch, and the students, each
on its own range of ranks with its own changes to the rest of the config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from dinoscale.utils.knobs import knob


@dataclass
class StudentGroupConfig:
    name: str = knob("", "the student's name: its run folder under train.output_dir")
    ranks_range: List[int] = knob([], "[first, end) ranks of this student's group (DINOv3's ranks_range)")
    overrides: List[str] = knob([], "key.sub=value changes of the config for this student, e.g. student.arch=vit_small")


@dataclass
class DistillConfig:
    teacher: str = knob("", "the frozen teacher: a dinoscale training run folder (config.yaml and checkpoints with "
                            "the EMA teacher's DINO and iBOT heads)")
    global_batch_size: int = knob(0, "images per step over all ranks; the teacher sees each once, every student "
                                     "trains on all of them", min=0)
    students: List[StudentGroupConfig] = knob([], "the students and their rank groups")
