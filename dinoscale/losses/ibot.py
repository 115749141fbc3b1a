"""iBOT loss: the student predicts the teacher's targets for the patch tokens it saw masked."""

from __future__ import annotations

from torch import Tensor

from dinoscale.losses.targets import PrototypeCrossEntropy


class iBOTPatchLoss(PrototypeCrossEntropy):  # noqa: N801 - the reference's name
    """Cross-entropy per masked token, weighted so that every image counts equally."""

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, masks_weight: Tensor, n_images: int) -> Tensor:
        """student_logits, teacher_probs [M, K] for the M masked tokens of the batch;
        masks_weight [M]: 1 / (masked tokens of the token's image).

        Returns sum over images of their mean token loss, divided by `n_images` (all images of the
        batch, masked or not — as the reference, so the loss scales with the masked fraction).
        """
        token_losses = -(teacher_probs.float() * self.student_log_probs(student_logits)).sum(dim=-1)
        return (token_losses * masks_weight.float()).sum() / n_images
