"""Teacher targets shared by the DINO and iBOT losses.

The teacher's prototype logits become target distributions in one of three ways:
- "centering": softmax((logits - centre) / T) with an EMA centre of past teacher logits (DINO);
- "sinkhorn_knopp": balanced assignment by Sinkhorn-Knopp normalisation (SwAV, DINOv2/v3);
- "none": plain softmax(logits / T), which collapses by design (useful as a counterfactual).
All reductions run over every rank when torch.distributed is initialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoscale.errors import ConfigError
from dinoscale.distributed import all_reduce_max, all_reduce_sum

TEACHER_NORMALISATIONS = ("centering", "sinkhorn_knopp", "none")


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """Soft assignment [N, K] of N samples to K prototypes with (near) uniform prototype usage.

    Starts from Q ∝ exp(logits / T) and alternately rescales every prototype to total mass 1/K and
    every sample to mass 1/N_total (N_total: samples over all ranks). The sample step comes last,
    so each returned row sums to exactly one; prototype masses are uniform up to the iterations.
    """
    logits = logits.float()
    n_prototypes = logits.shape[1]
    # subtracting the global maximum leaves Q unchanged after normalisation and keeps exp finite
    shift = all_reduce_max(logits.max().reshape(1) if logits.numel() else logits.new_full((1,), -1e30))
    q = torch.exp((logits - shift) / teacher_temp)
    n_samples = all_reduce_sum(logits.new_tensor([float(logits.shape[0])]))
    tiny = torch.finfo(q.dtype).tiny
    q /= all_reduce_sum(q.sum().reshape(1)).clamp_min(tiny)
    for _ in range(n_iterations):
        q /= all_reduce_sum(q.sum(dim=0, keepdim=True)).clamp_min(tiny) * n_prototypes
        q /= q.sum(dim=1, keepdim=True).clamp_min(tiny) * n_samples
    return q * n_samples


class PrototypeCrossEntropy(nn.Module):
    """Cross-entropy between teacher targets and the student's softmax over K prototypes.

    Holds the `center` buffer (used by "centering" only) so that it is saved with the model.
    """

    def __init__(self, n_prototypes: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 teacher_normalisation: str = "sinkhorn_knopp", sinkhorn_iterations: int = 3):
        super().__init__()
        if teacher_normalisation not in TEACHER_NORMALISATIONS:
            raise ConfigError(f"train.centering = {teacher_normalisation!r} is not one of "
                              f"{', '.join(TEACHER_NORMALISATIONS)}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.teacher_normalisation = teacher_normalisation
        self.sinkhorn_iterations = sinkhorn_iterations
        self.register_buffer("center", torch.empty(1, n_prototypes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The centre starts at zero."""
        with torch.no_grad():
            self.center.zero_()

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Target distributions [N, K] for teacher logits [N, K]; updates the centre when centering."""
        if self.teacher_normalisation == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp, self.sinkhorn_iterations)
        logits = teacher_logits.float()
        if self.teacher_normalisation == "none":
            return F.softmax(logits / teacher_temp, dim=-1)
        probs = F.softmax((logits - self.center) / teacher_temp, dim=-1)
        self.update_center(logits)
        return probs

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """centre <- m * centre + (1 - m) * mean of the teacher logits over all ranks."""
        logits = teacher_logits.float()
        # one collective for the sum and the count
        totals = torch.cat([logits.sum(dim=0), logits.new_tensor([float(logits.shape[0])])])
        all_reduce_sum(totals)
        count = totals[-1]
        if count > 0:
            batch_mean = totals[:-1] / count
            self.center.mul_(self.center_momentum).add_(batch_mean.unsqueeze(0), alpha=1 - self.center_momentum)

    def student_log_probs(self, student_logits: Tensor) -> Tensor:
        return F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
