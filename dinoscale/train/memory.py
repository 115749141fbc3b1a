"""What a rank holds to train a model sharded with FSDP2, from the model built on the meta device
(no memory): fp32 parameters, gradients and AdamW's two moments of the student, fp32 teachers,
all in dim-0 chunks of ceil(n / ranks) rows as FSDP2 cuts them (the largest on rank 0), the loss
buffers, and the full tensors of the largest module the sharded build materialises at once."""

from __future__ import annotations

import math

from torch import nn

from dinoscale.models.init import own_tensors
from dinoscale.train.ssl import SSLMetaArch, student_init_steps

GIB = 2**30
BYTES_FP32 = 4
# per student parameter: fp32 weight, fp32 gradient, AdamW exp_avg and exp_avg_sq
STUDENT_BYTES_PER_PARAM = 4 * BYTES_FP32


def sharded_numel(module: nn.Module, ranks: int) -> int:
    """Parameter elements of the largest shard (rank 0's) of `module` over `ranks` ranks."""
    return sum(math.ceil(p.shape[0] / ranks) * (p.numel() // p.shape[0]) for p in module.parameters())


def frozen_bytes(module: nn.Module, ranks: int) -> int:
    """Per-rank bytes of a module that is only run forward (fp32 shards)."""
    return sharded_numel(module, ranks) * BYTES_FP32


def training_memory(model: SSLMetaArch, ranks: int) -> dict[str, float]:
    """Per-rank GiB of training `model` (built on meta) sharded over `ranks` ranks."""
    buffers = sum(b.numel() for b in model.buffers()) * BYTES_FP32
    largest_step = max(sum(t.numel() for t in own_tensors(owner).values())
                       for owner, _ in student_init_steps(model.student)) * BYTES_FP32
    student = sharded_numel(model.student, ranks) * STUDENT_BYTES_PER_PARAM
    teachers = sum(frozen_bytes(b, ranks) for b in model.branches()[1:])
    return {"student_params_grads_adamw_gib": student / GIB, "teachers_gib": teachers / GIB,
            "buffers_gib": buffers / GIB, "largest_materialised_module_gib": largest_step / GIB,
            "per_rank_gib": (student + teachers + buffers + largest_step) / GIB}
