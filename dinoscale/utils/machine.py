"""The machine a measurement ran on, and the process's memory: what benchmarks and training metrics
report beside their figures (no host names or paths)."""

from __future__ import annotations

import os
import platform
import resource
from importlib import metadata
from pathlib import Path

import torch

from dinoscale.utils.device import cpu_has_native_bf16


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (its high-water mark), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Resident memory of this process now, in MiB (Linux)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of `device`: CUDA's allocator high-water mark, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mib()


def describe_machine(**extra) -> dict:
    """What measured figures depend on: CPU, cores, memory, GPUs, threads, native bf16, library versions,
    OMP_WAIT_POLICY; and `extra`."""
    import faiss

    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
              if line.startswith("model name")]

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {
        "cpu": models[0] if models else platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": cpu_has_native_bf16(),
        "torch_threads": torch.get_num_threads(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        **{package: version(package) for package in ("torchvision", "timm", "lightly", "webdataset")},
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        **extra,
    }
