"""Training metrics: JSONL lines (rank 0), TensorBoard when installed, and FLOP accounting for MFU
(`step_flops` of one step of the SSL meta-architecture, against the measured matmul peak)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn


class MetricsLogger:
    """Appends one JSON object per logged step to RUN/metrics.jsonl (flushed, so a kill loses nothing),
    stamped with the wall-clock time it was written (`timestamp`, seconds since the epoch)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._writer = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._writer = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {**record, "timestamp": time.time()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._writer is not None:
            step = record.get("iteration", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("iteration", "timestamp"):
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def backbone_forward_flops(backbone: nn.Module, n_images: int, n_tokens: int) -> float:
    """Matmul FLOPs of one forward: 2 x (block weights) per token plus attention (QK^T and AV)."""
    block_weights = sum(p.numel() for n, p in backbone.blocks.named_parameters() if p.dim() == 2)
    depth, dim = len(backbone.blocks), backbone.embed_dim
    linear = 2 * block_weights * n_tokens
    attention = depth * 2 * 2 * n_tokens * n_tokens * dim
    return float(n_images * (linear + attention))


def head_forward_flops(head: nn.Module, n_rows: int) -> float:
    return float(2 * n_rows * sum(p.numel() for p in head.parameters() if p.dim() == 2))


def step_flops(model: nn.Module, batch: dict) -> float:
    """Matmul FLOPs of one training step on this rank: student forward+backward (3x forward) on
    all crops, teacher (and Gram teacher) forward on the global crops."""
    backbone = model.student.backbone
    patch = backbone.patch_size
    extra_tokens = 1 + backbone.n_storage_tokens

    def crops_flops(crops: torch.Tensor) -> float:
        if crops.numel() == 0:
            return 0.0
        tokens = (crops.shape[-2] // patch) * (crops.shape[-1] // patch) + extra_tokens
        return backbone_forward_flops(backbone, crops.shape[0], tokens)

    global_crops, local_crops = batch["collated_global_crops"], batch["collated_local_crops"]
    n_cls = global_crops.shape[0] + local_crops.shape[0]
    n_masked = int(batch["mask_indices_list"].numel())
    student = crops_flops(global_crops) + crops_flops(local_crops)
    student += sum(head_forward_flops(m, n_cls if n == "dino_head" else n_masked)
                   for n, m in model.student.items() if n != "backbone")
    teacher = crops_flops(global_crops) + head_forward_flops(model.teacher.dino_head, global_crops.shape[0])
    if model.gram_teacher is not None:
        teacher += crops_flops(batch.get("collated_gram_teacher_crops", global_crops))
    return 3 * student + teacher


_PEAKS: dict[tuple, float] = {}


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 0.25,
                        trials: int = 5) -> float:
    """Achievable matmul FLOP/s of this device in `dtype` with the current thread count (the MFU
    denominator): the best of `trials` timed runs, so that a moment of contention does not lower it.
    Measured once per process for each device, dtype, size and thread count."""
    key = (device, dtype, size, torch.get_num_threads())
    if key not in _PEAKS:
        _PEAKS[key] = _best_matmul_rate(device, dtype, size, seconds, trials)
    return _PEAKS[key]


def _best_matmul_rate(device: torch.device, dtype: torch.dtype, size: int, seconds: float, trials: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(trials):
        _synchronize(device)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
            _synchronize(device)
        best = max(best, 2 * size**3 * count / (time.perf_counter() - start))
    return best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
