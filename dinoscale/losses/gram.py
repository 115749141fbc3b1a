"""Gram anchoring (DINOv3): keep the student's patch-similarity structure close to a Gram teacher's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoscale.errors import ConfigError

RESIZE_METHODS = ("bicubic", "bilinear", "nearest")


class GramLoss(nn.Module):
    """MSE between the Gram matrices of student and teacher patch features [B, N, D].

    `normalized`: L2-normalise features first (cosine similarities). `img_level`: one N x N matrix
    per image, else one (B*N) x (B*N) matrix over the batch. `remove_neg`: negative similarities of
    both matrices become 0; `remove_only_teacher_neg`: the teacher's negatives become 0, and the
    student's only where the teacher's were negative too. The teacher side gets no gradient.
    """

    def __init__(self, normalized: bool = True, img_level: bool = False, remove_neg: bool = False,
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
            student_sim = self._gram(student_patches.float())
            with torch.no_grad():
                teacher_sim = self._gram(teacher_patches.float())
        if self.remove_neg:
            student_sim = student_sim.clamp_min(0.0)
            teacher_sim = teacher_sim.clamp_min(0.0)
        elif self.remove_only_teacher_neg:
            student_sim = torch.where((student_sim < 0) & (teacher_sim < 0), 0.0, student_sim)
            teacher_sim = teacher_sim.clamp_min(0.0)
        return F.mse_loss(student_sim, teacher_sim)

    def _gram(self, patches: Tensor) -> Tensor:
        if self.normalized:
            patches = F.normalize(patches, dim=-1)
        if not self.img_level:
            patches = patches.flatten(0, 1)
        return patches @ patches.transpose(-1, -2)


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
