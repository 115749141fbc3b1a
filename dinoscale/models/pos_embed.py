"""Resizing DINOv2's learned absolute position embedding to another patch grid."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def interpolate_pos_embed(pos_embed: Tensor, rows: int, cols: int, offset: float, antialias: bool) -> Tensor:
    """(1, 1 + M*M, D) embedding of a square M x M grid -> (1, 1 + rows*cols, D), bicubic, in float32.

    With `offset` > 0 the grid is scaled by (rows + offset) / M as in the reference code (the
    offset guards against the output size rounding down); it changes the sampling positions
    slightly, so checkpoints trained with it keep it. With offset 0 the output size is given
    directly. The CLS entry is carried over unchanged; the result has the input's dtype.
    """
    n_patches = pos_embed.shape[1] - 1
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"position embedding of {n_patches} patches is not a square grid")
    if (rows, cols) == (side, side):
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if offset:
        size_kwargs = {"scale_factor": ((rows + offset) / side, (cols + offset) / side)}
    else:
        size_kwargs = {"size": (rows, cols)}
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **size_kwargs)
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat((pos_embed[:, :1].float(), grid), dim=1).to(pos_embed.dtype)
