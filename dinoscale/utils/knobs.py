"""`knob`: how every config field is declared, with its documentation and allowed values. The metadata
drives the config's validation and the configuration reference in the README (`dinoscale.config`)."""

from __future__ import annotations

from dataclasses import field
from typing import Any, Sequence


def knob(default: Any, help: str, *, choices: Sequence[Any] | None = None, min: float | None = None,
         max: float | None = None) -> Any:
    """A config field with its documentation and allowed values."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)
