"""Devices and precision: CUDA when present, else CPU; bf16 autocast where the hardware has it,
never fp16 on CPU (CPUs have no fast fp16 matmul)."""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Iterator

import torch

from dinoscale.errors import ConfigError


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: bf16 matmuls run natively (elsewhere bf16 on CPU is emulated and slow)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """bf16 when asked or when `auto` finds hardware support, None for fp32; never fp16."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ConfigError(f"precision {precision!r} is unknown; choose auto, bf16 or fp32")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


def inference_autocast(device: torch.device, precision: str = "auto") -> torch.autocast:
    """The autocast context of evaluation forwards (disabled for fp32)."""
    dtype = autocast_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op CPU threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
