"""The SSL objectives: DINO (CLS), iBOT (masked patches), KoLeo (CLS spread), Gram anchoring (patches)."""

from dinoscale.losses.dino import DINOLoss
from dinoscale.losses.gram import GramLoss, resize_patch_grid
from dinoscale.losses.ibot import iBOTPatchLoss
from dinoscale.losses.koleo import KoLeoLoss
from dinoscale.losses.targets import TEACHER_NORMALISATIONS, PrototypeCrossEntropy, sinkhorn_knopp

__all__ = ["DINOLoss", "GramLoss", "KoLeoLoss", "PrototypeCrossEntropy", "TEACHER_NORMALISATIONS",
           "iBOTPatchLoss", "resize_patch_grid", "sinkhorn_knopp"]
