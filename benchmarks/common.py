"""What every benchmark reports beside its figures: the process's peak memory and the machine."""

from __future__ import annotations

import os
import platform
import resource

import torch

from dinoscale.utils.device import cpu_has_native_bf16


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine(**extra) -> dict:
    """The CPU, its cores, torch's threads and version, native bf16, the GPU; and `extra`."""
    return {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "avx512_bf16": cpu_has_native_bf16(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None, **extra}
