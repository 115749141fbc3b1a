"""How the SSL model is spread over ranks: FSDP2, activation checkpointing, compile.

Kept apart from the model code (as torchtitan does): `parallelize` takes the plain modules and
applies, per transformer block, activation checkpointing, `torch.compile` and `fully_shard`,
then shards each backbone and head at its root. The EMA teacher and the Gram teacher are
sharded the same way as the student, so the EMA update is a local operation on matching shards.
A single process is a world of one and is sharded the same way, so it computes in the same
precision as N ranks.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dinoscale.errors import DinoscaleError

# The backbone returns DINOv2's feature dict, whose tokens are slices (views) of one tensor. FSDP2
# warns on every such output that an in-place op on it would skip the pre-backward hook; the SSL
# code only reads them, and the 1-vs-2-rank loss and gradient tests would catch a skipped hook.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor", category=UserWarning)

# matmul and attention outputs are kept; norms, activations and the rest are recomputed
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed_forward(original_forward, mode: str, *args, **kwargs):
    if not torch.is_grad_enabled():
        return original_forward(*args, **kwargs)
    if mode == "selective":
        context_fn = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
        return checkpoint(original_forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)
    return checkpoint(original_forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(blocks: Iterable[nn.Module], mode: str) -> None:
    """Recompute each block in backward ("full") or all but its matmuls ("selective").

    The block's forward is wrapped in place, so parameter names (and checkpoints) do not change.
    """
    if mode == "none":
        return
    for block in blocks:
        block.forward = functools.partial(_checkpointed_forward, block.forward, mode)


def apply_compile(blocks: Iterable[nn.Module]) -> None:
    for block in blocks:
        block.compile()


def mixed_precision_policy(compute_dtype: torch.dtype) -> MixedPrecisionPolicy:
    """Blocks and heads: parameters gathered in the compute dtype, fp32 gradient reduction; fp32
    masters stay sharded. Inputs are not cast: under autocast the residual stream stays in the
    dtype the backbone root gives it, and RoPE tables stay fp32."""
    if compute_dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


# the backbone root (patch embedding, tokens, position embedding, final norms: a few 100k parameters)
# keeps fp32 parameters, so the tokens it makes, and with them the residual stream, are fp32
ROOT_POLICY = MixedPrecisionPolicy(cast_forward_inputs=False)


def shard_backbone(backbone: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy) -> None:
    blocks = list(backbone.blocks)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(backbone, mesh=mesh, mp_policy=ROOT_POLICY)
    # prefetch the next block's parameters while the current one computes
    for current, following in zip(blocks, blocks[1:]):
        current.set_modules_to_forward_prefetch([following])
        following.set_modules_to_backward_prefetch([current])


def parallelize(branches: Iterable[nn.ModuleDict], device: torch.device, world_size: int, compute_dtype: torch.dtype,
                activation_checkpointing: str = "none", compile_blocks: bool = False,
                checkpointed: Iterable[nn.ModuleDict] = (), mesh: DeviceMesh | None = None) -> None:
    """Shard every branch (student, teacher, Gram teacher: ModuleDicts of backbone and heads).

    `checkpointed` names the branches that run a backward (the student): they get activation
    checkpointing; the others (teachers) reshard right after forward. Needs a process group, also
    for a world of one (`init_distributed` starts it). `mesh` shards over a group of ranks instead of
    the whole world (a distillation student).
    """
    checkpointed = list(checkpointed)
    mesh = mesh or init_device_mesh(device.type, (world_size,))
    policy = mixed_precision_policy(compute_dtype)
    for branch in branches:
        backbone = branch["backbone"]
        if any(branch is c for c in checkpointed):
            apply_activation_checkpointing(backbone.blocks, activation_checkpointing)
        if compile_blocks:
            apply_compile(backbone.blocks)
        shard_backbone(backbone, mesh, policy)
        for name, module in branch.items():
            if name != "backbone":
                fully_shard(module, mesh=mesh, mp_policy=policy)
        if not any(branch is c for c in checkpointed):
            for module in branch.values():
                # a root FSDP module stays gathered after forward (it expects a backward); the
                # teachers never run one, so they reshard at once (and the EMA sees shards)
                module.register_forward_hook(lambda mod, args, out: mod.reshard())


def fill_from_rank0(module: nn.Module, read_full_state: Callable[[], dict[str, torch.Tensor]]) -> None:
    """Fill a sharded module with a full state dict that rank 0 alone reads (`read_full_state`); the
    shards are filled by broadcast. A DinoscaleError on rank 0 is raised on every rank, rather than
    leaving the others waiting for the broadcast."""
    full, error = {}, None
    if dist.get_rank() == 0:
        try:
            full = read_full_state()
        except DinoscaleError as err:
            error = err
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise box[0]
    set_model_state_dict(module, full,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True))


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)
