"""Sharing out the global batch: each rank holds the crops, masks and teacher targets of its
teacher share of the images and needs those of its student share (`DistillPlan`). One
`all_to_all` per tensor moves every image's rows from the rank that loaded it to every rank that
trains on it, so no rank ever holds more than its own two shares. The tensors stay on the device the
backend needs (NCCL: CUDA, gloo: CPU).
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.distributed as dist
from torch import Tensor

from dinoscale.data.collate import mask_fields
from dinoscale.distill.plan import DistillPlan

N_GLOBAL_CROPS = 2


def _overlap(a: range, b: range) -> range:
    return range(max(a.start, b.start), max(min(a.stop, b.stop), max(a.start, b.start)))


class BatchRouting:
    """Which of this rank's images go to which rank, and which images it receives from which."""

    def __init__(self, plan: DistillPlan, rank: int):
        ranks = range(plan.world_size)
        self.mine = plan.teacher_share(rank)
        self.wanted = plan.student_share(rank)
        # per destination rank, the positions (in this rank's teacher share) of the images it trains on
        self.sent = [[i - self.mine.start for i in _overlap(self.mine, plan.student_share(r))] for r in ranks]
        # per source rank, how many of this rank's student images it holds
        self.received = [len(_overlap(plan.teacher_share(r), self.wanted)) for r in ranks]

    def images(self, rows: Tensor) -> Tensor:
        """Per-image rows [teacher share, ...] -> [student share, ...] (the global batch's order)."""
        index = torch.tensor([i for per_rank in self.sent for i in per_rank], dtype=torch.long, device=rows.device)
        return _all_to_all(rows.index_select(0, index), [len(s) for s in self.sent], self.received)

    def image_runs(self, rows: Tensor, rows_per_image: Tensor, received_rows_per_image: Tensor) -> Tensor:
        """Rows that come in runs of `rows_per_image[i]` for image i of the teacher share, in image
        order -> the runs of the student share's images (`received_rows_per_image` of them each)."""
        counts = rows_per_image.tolist()
        starts = list(accumulate(counts, initial=0))
        index, send_counts = [], []
        for per_rank in self.sent:
            runs = [j for i in per_rank for j in range(starts[i], starts[i] + counts[i])]
            index += runs
            send_counts.append(len(runs))
        received = received_rows_per_image.tolist()
        offsets = list(accumulate(self.received, initial=0))
        recv_counts = [sum(received[a:b]) for a, b in zip(offsets, offsets[1:])]
        index_tensor = torch.tensor(index, dtype=torch.long, device=rows.device)
        return _all_to_all(rows.index_select(0, index_tensor), send_counts, recv_counts)

    def student_batch(self, batch: dict, cls_targets: Tensor, patch_targets: Tensor) -> dict:
        """The student share's batch (crops, masks and their derived entries, crop-major as the data
        stream collates them) with the teacher's targets: cls_probs [2, B, K] and masked_patch_probs
        [M, K_ibot] in the order of the masked tokens."""
        masks = batch["collated_masks"]
        image_masks = self.images(_image_major(masks.to(torch.uint8), N_GLOBAL_CROPS)).bool()  # [B, 2, N]
        # iBOT targets: rows of masked tokens, crop-major; regrouped by image to travel with it
        crop_of_row = masks.flatten().nonzero().flatten() // masks.shape[1]
        n_mine = len(self.mine)
        by_image = torch.argsort((crop_of_row % n_mine) * N_GLOBAL_CROPS + crop_of_row // n_mine, stable=True)
        rows_per_image = _image_major(masks, N_GLOBAL_CROPS).flatten(1).sum(1)
        received_per_crop = image_masks.sum(2)  # [B, 2]
        patch_rows = self.image_runs(patch_targets[by_image], rows_per_image, received_per_crop.sum(1))
        # back to crop-major: key (crop, image) of every received row, in its image-major order
        n_wanted = len(self.wanted)
        device = masks.device
        keys = (torch.arange(N_GLOBAL_CROPS, device=device).repeat(n_wanted) * n_wanted
                + torch.arange(n_wanted, device=device).repeat_interleave(N_GLOBAL_CROPS))
        row_keys = keys.repeat_interleave(received_per_crop.flatten())
        patch_rows = patch_rows[torch.argsort(row_keys, stable=True)]

        local = batch["collated_local_crops"]
        out = {
            "collated_global_crops": _crop_major(self.images(_image_major(batch["collated_global_crops"],
                                                                          N_GLOBAL_CROPS))),
            "collated_local_crops": local if not local.numel() else _crop_major(self.images(
                _image_major(local, local.shape[0] // n_mine))),
            **mask_fields(_crop_major(image_masks)),
            "cls_probs": self.images(_image_major(cls_targets, N_GLOBAL_CROPS)).transpose(0, 1),
            "masked_patch_probs": patch_rows,
        }
        return out


def _image_major(crop_major: Tensor, n_crops: int) -> Tensor:
    """[n_crops * B, ...] (crop c of image i at row c*B + i) -> [B, n_crops, ...]."""
    return crop_major.unflatten(0, (n_crops, -1)).transpose(0, 1).contiguous()


def _crop_major(image_major: Tensor) -> Tensor:
    return image_major.transpose(0, 1).flatten(0, 1).contiguous()


def _all_to_all(rows: Tensor, send_counts: list[int], recv_counts: list[int]) -> Tensor:
    out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts)
    return out
