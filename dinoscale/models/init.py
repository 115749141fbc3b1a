"""Initialising a model whose tensors live elsewhere — sharded over ranks, or on another device —
with exactly the values that building it eagerly gives for the same seed.

Building a module eagerly draws from the global RNG in a fixed order: every submodule's
`reset_parameters()` as it is constructed (PyTorch's convention; nn.Linear and nn.Conv2d draw
their default init there), then, for a model that has them, its own `init_steps()` (what its
`init_weights()` runs), which overwrite most of those draws. `eager_init_steps(module)` lists
that order as (owner, function) steps; each step writes only tensors its owner holds itself, and
overwrites each tensor it writes completely.

`materialize(source, steps, targets)` replays the steps on a meta-device copy of the model, one
owner at a time: the owner's own tensors get full-size CPU storage, the step runs (drawing from the
global RNG exactly where eager construction did), and each written tensor is copied into the
targets — only this rank's shard when a target's tensor is a DTensor. Peak memory is the targets
plus the largest single module's full tensors. Every rank draws the whole sequence, so the result
does not depend on the number of ranks.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

InitStep = tuple[nn.Module, Callable[[], None]]


def own_tensors(module: nn.Module) -> dict[str, Tensor]:
    """The parameters and buffers a module holds itself (not its children's)."""
    return {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}


def eager_init_steps(module: nn.Module) -> Iterator[InitStep]:
    """What building `module` eagerly does to its tensors, in RNG order: each submodule's
    `reset_parameters()` in construction order, then the module's own `init_steps()` if it has them."""
    for sub in module.modules():
        if own_tensors(sub) and hasattr(sub, "reset_parameters"):
            yield sub, sub.reset_parameters
    if hasattr(module, "init_steps"):
        yield from module.init_steps()


def run_steps(steps: Iterable[InitStep]) -> None:
    """Run the steps on the modules themselves (an eager model's `init_weights`)."""
    for _, init in steps:
        init()


@torch.no_grad()
def materialize(source: nn.Module, steps: Iterable[InitStep], targets: Sequence[nn.Module]) -> None:
    """Initialise `targets` (modules with `source`'s structure, their tensors allocated, possibly
    sharded) with the values of `steps` run eagerly on `source`, a meta-device model.

    Each step's tensors are views of one scratch buffer, reused by every step (freeing and
    allocating full-size tensors step after step fragments the heap, which then holds several
    hundred MB more than the largest module). A tensor that still starts with NaN after its step was
    not written by it. Raises if a target tensor is left unwritten, so no uninitialised memory survives."""
    steps = list(steps)
    names = {id(module): name for name, module in source.named_modules()}
    scratch = torch.empty(max(_scratch_bytes(owner) for owner, _ in steps), dtype=torch.uint8)
    written: set[str] = set()
    for owner, init in steps:
        prefix = names[id(owner)]
        _place_in(owner, scratch)
        init()
        for name, full in own_tensors(owner).items():
            if full.numel() and math.isnan(full.view(-1)[0]):
                continue  # not written by this step (steps write whole tensors): keep an earlier step's values
            qualified = f"{prefix}.{name}" if prefix else name
            for target in targets:
                _copy_into(target, qualified, full)
            written.add(qualified)
        owner.to_empty(device="meta", recurse=False)
    for target in targets:
        missing = [n for n, _ in _named_tensors(target) if n not in written]
        if missing:
            raise RuntimeError(f"no initialisation step wrote {missing[:5]} ({len(missing)} tensors)")


_ALIGN = 64  # bytes: every view in the scratch buffer starts on a cache line


def _scratch_bytes(owner: nn.Module) -> int:
    return sum(-(-t.numel() * t.element_size() // _ALIGN) * _ALIGN for t in own_tensors(owner).values())


def _place_in(owner: nn.Module, scratch: Tensor) -> None:
    """Give the owner's own tensors storage in `scratch`, filled with NaN (floating tensors only)."""
    offset = 0
    for name, tensor in own_tensors(owner).items():
        if not tensor.is_floating_point():
            raise TypeError(f"{name}: only floating-point tensors can be materialised step by step")
        nbytes = tensor.numel() * tensor.element_size()
        view = scratch[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape).fill_(float("nan"))
        offset += -(-nbytes // _ALIGN) * _ALIGN
        if name in owner._parameters:
            owner._parameters[name] = nn.Parameter(view, requires_grad=tensor.requires_grad)
        else:
            owner._buffers[name] = view


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def _copy_into(target: nn.Module, qualified: str, full: Tensor) -> None:
    """Copy `full` into `target`'s tensor of that name (absent names are skipped: a Gram teacher has
    no heads), only this rank's part of a DTensor."""
    module_name, _, name = qualified.rpartition(".")
    try:
        module = target.get_submodule(module_name)
    except AttributeError:
        return
    tensor = own_tensors(module).get(name)
    if tensor is None:
        return
    if isinstance(tensor, DTensor):
        local = tensor.to_local()
        tensor, full = local, _local_part(full, tensor, local)
    tensor.copy_(full)


def _local_part(full: Tensor, dtensor: DTensor, local: Tensor) -> Tensor:
    """This rank's part of `full` as a view: dim-d chunks of ceil(n / ranks) rows, as FSDP2 and
    DTensor's Shard(d) cut them."""
    if dtensor.device_mesh.ndim != 1:
        raise NotImplementedError("materialising a DTensor on a mesh of more than one dimension")
    (placement,) = dtensor.placements
    if placement.is_replicate():
        return full
    if not placement.is_shard():
        raise NotImplementedError(f"materialising a DTensor placed as {placement}")
    dim, n = placement.dim, full.shape[placement.dim]
    step = -(-n // dtensor.device_mesh.size())
    return full.narrow(dim, min(dtensor.device_mesh.get_local_rank() * step, n), local.shape[dim])
