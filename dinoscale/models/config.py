"""The `student.*` section of the config, derived from `BackboneSpec`'s fields (declared once, in
dinoscale/models/spec.py) plus the weights to start from (`pretrained_weights`, `resume_from_teacher_chkpt`).
`arch` names a preset; a field left null takes the preset's value (dinoscale/models/presets.py)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Optional, Union

from dinoscale.models.spec import NOT_A_KNOB, SPEC_DEFAULT, BackboneSpec
from dinoscale.utils.knobs import knob


def _optional(tp: Any) -> Any:
    """`T` or `T | None` as typing.Optional[T] (the spelling OmegaConf reads)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        (tp,) = [arg for arg in typing.get_args(tp) if arg is not type(None)]
    return Optional[tp]


def _student_fields() -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(BackboneSpec)
    fields = []
    for f in dataclasses.fields(BackboneSpec):
        meta = f.metadata
        if meta["student"] == NOT_A_KNOB:
            continue
        default = f.default if meta["student"] == SPEC_DEFAULT else meta["student"]
        tp = hints[f.name]
        if default is None or typing.get_origin(tp) in (Union, types.UnionType):
            tp = _optional(tp)
        fields.append((f.name, tp, knob(default, meta["help"], choices=meta["choices"] and list(meta["choices"]),
                                        min=meta["min"], max=meta["max"])))
    return fields


StudentConfig = dataclasses.make_dataclass(
    "StudentConfig",
    [*_student_fields(),
     ("pretrained_weights", str, knob("", "official DINOv2/DINOv3 or dinoscale backbone file to start from")),
     ("resume_from_teacher_chkpt", str, knob("", "a teacher with its DINO/iBOT heads to continue from (high-resolution "
                                                 "adaptation): a dinoscale run directory (its latest checkpoint) or a "
                                                 "file in the reference's {'teacher': {...}} layout"))])
StudentConfig.__module__ = __name__
StudentConfig.__doc__ = "The backbone: BackboneSpec's fields (null: the preset's value) and the weights to start from."
