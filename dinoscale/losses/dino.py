"""DINO loss on the CLS token: every student crop predicts the teacher's targets of every global crop."""

from __future__ import annotations

import torch
from torch import Tensor

from dinoscale.losses.targets import PrototypeCrossEntropy


class DINOLoss(PrototypeCrossEntropy):
    """Mean cross-entropy over all (student crop, teacher crop) pairs of the same image."""

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, ignore_diagonal: bool = False) -> Tensor:
        """student_logits [S, B, K], teacher_probs [T, B, K] (rows sum to one).

        With `ignore_diagonal`, pairs s == t (the same global view seen by both) are skipped;
        the result is the average over the B * (S*T - min(S, T)) remaining pairs.
        """
        n_student, batch, _ = student_logits.shape
        n_teacher = teacher_probs.shape[0]
        log_probs = self.student_log_probs(student_logits)
        with torch.autocast(device_type=log_probs.device.type, enabled=False):  # einsum would run in bf16
            pair_losses = -torch.einsum("sbk,tbk->st", log_probs, teacher_probs.float())
        n_pairs = n_student * n_teacher
        if ignore_diagonal:
            n_diagonal = min(n_student, n_teacher)
            pair_losses = pair_losses * (1 - torch.eye(n_student, n_teacher, device=pair_losses.device))
            n_pairs -= n_diagonal
        if n_pairs == 0:
            raise ValueError("ignore_diagonal with a single student and teacher crop leaves no pair")
        return pair_losses.sum() / (batch * n_pairs)
