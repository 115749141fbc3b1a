"""Gram anchoring (DINOv3): keep the student's patch-similarity structure close to a Gram teacher's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoscale.errors import ConfigError

RESIZE_METHODS = ("bicubic", "bilinear", "nearest")


# entries of a block of rows of the batch-level similarity matrices (4 MiB per fp32 block)
GRAM_BLOCK_ELEMENTS = 1 << 20


class GramLoss(nn.Module):
    """MSE between the Gram matrices of student and teacher patch features [B, N, D].

    `normalized`: L2-normalise features first (cosine similarities). `img_level`: one N x N matrix
    per image, else one (B*N) x (B*N) matrix over the batch, computed block by block (its value
    and gradient are exact; no full matrix is kept). `remove_neg`: negative similarities of both
    matrices become 0; `remove_only_teacher_neg`: the teacher's negatives become 0, and the
    student's only where the teacher's were negative too. The teacher side gets no gradient.
    """

    def __init__(self, normalized: bool = True, img_level: bool = True, remove_neg: bool = False,
                 remove_only_teacher_neg: bool = False):
        super().__init__()
        if remove_neg and remove_only_teacher_neg:
            raise ConfigError("gram.remove_neg and gram.remove_only_teacher_neg are exclusive; set one of them to false")
        self.normalized = normalized
        self.img_level = img_level
        self.remove_neg = remove_neg
        self.remove_only_teacher_neg = remove_only_teacher_neg

    def forward(self, student_patches: Tensor, teacher_patches: Tensor) -> Tensor:
        with torch.autocast(device_type=student_patches.device.type, enabled=False):  # float32 Gram matrices
            student, teacher = student_patches.float(), teacher_patches.float().detach()
            if self.normalized:
                student, teacher = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
            if not self.img_level:
                return _BatchGramMSE.apply(student.flatten(0, 1), teacher.flatten(0, 1), self._remove_negatives)
            student_sim, teacher_sim, _ = self._remove_negatives(student @ student.transpose(-1, -2),
                                                                 teacher @ teacher.transpose(-1, -2))
            return F.mse_loss(student_sim, teacher_sim)

    def _remove_negatives(self, student_sim: Tensor, teacher_sim: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Both similarity matrices with the negatives removed as configured, and where the student's
        entries were kept (None: all of them)."""
        if not (self.remove_neg or self.remove_only_teacher_neg):
            return student_sim, teacher_sim, None
        kept = student_sim >= 0 if self.remove_neg else (student_sim >= 0) | (teacher_sim >= 0)
        return torch.where(kept, student_sim, 0.0), teacher_sim.clamp_min(0.0), kept


class _BatchGramMSE(torch.autograd.Function):
    """mean((S S^T - T T^T)^2) over all M x M pairs of rows of S, T [M, D] (negatives removed by
    `remove_negatives`), one block of rows at a time. The gradient is accumulated in the same pass:
    with E = dL/d(S S^T), which is symmetric, dL/dS = 2 E S, so each block of rows of E gives that
    block of rows of dL/dS."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, remove_negatives) -> Tensor:
        n_rows = student.shape[0]
        block = max(1, GRAM_BLOCK_ELEMENTS // n_rows)
        squared_error = student.new_zeros(())
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        for start in range(0, n_rows, block):
            rows = slice(start, start + block)
            student_sim, teacher_sim, kept = remove_negatives(student[rows] @ student.T, teacher[rows] @ teacher.T)
            error = student_sim.sub_(teacher_sim).flatten()  # a fresh block: subtract in place
            squared_error += torch.dot(error, error)
            error = error.view_as(teacher_sim)
            if grad is not None:
                grad[rows] = (error if kept is None else error * kept) @ student
        if grad is not None:
            ctx.save_for_backward(grad.mul_(4.0 / n_rows**2))
        return squared_error / n_rows**2

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None


def resize_patch_grid(patches: Tensor, size: tuple[int, int], method: str = "bicubic",
                      antialias: bool = False) -> Tensor:
    """Resample patch features [B, h*w, D] on a square h x w grid to a `size` grid: [B, H*W, D]."""
    if method not in RESIZE_METHODS:
        raise ConfigError(f"gram.global_teacher_resize_method = {method!r} is not one of {', '.join(RESIZE_METHODS)}")
    if antialias and method == "nearest":
        raise ConfigError("gram.global_teacher_resize_antialias needs a bilinear or bicubic resize method")
    batch, n_patches, dim = patches.shape
    side = int(round(n_patches**0.5))
    if side * side != n_patches:
        raise ValueError(f"{n_patches} patch tokens do not form a square grid")
    if (side, side) == tuple(size):
        return patches
    grid = patches.transpose(1, 2).reshape(batch, dim, side, side)
    kwargs = {} if method == "nearest" else {"align_corners": False, "antialias": antialias}
    resized = F.interpolate(grid.float(), size=tuple(size), mode=method, **kwargs).to(patches.dtype)
    return resized.flatten(2).transpose(1, 2)
