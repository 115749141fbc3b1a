"""KoLeo regulariser (Sablayrolles et al. 2018): spread features by pushing nearest neighbours apart."""

from __future__ import annotations

import torch
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn

from dinoscale.errors import ConfigError
from dinoscale import distributed


class KoLeoLoss(nn.Module):
    """-mean_i log(min_{j != i} ||x_i - x_j||) over L2-normalised features [B, D], in float32.

    Degenerate inputs stay finite (the reference gives inf or NaN there):
    - fewer than two vectors to compare (a batch of one): the loss is 0 and its gradient is 0;
    - identical vectors: their distance is clamped to `eps`, so the loss is -log(eps) (about 18.4
      for 1e-8) and the gradient through that pair is 0 (no direction separates identical points).

    `distributed=True` (DINOv3) searches neighbours among the features of a group of ranks:
    `ranks_per_group` consecutive ranks (0: all ranks), gathered with gradients. Every rank must
    hold the same number of vectors.
    """

    def __init__(self, eps: float = 1e-8, distributed: bool = False, ranks_per_group: int = 0):
        super().__init__()
        self.eps = eps
        self.distributed = distributed
        self.ranks_per_group = ranks_per_group

    def forward(self, features: Tensor) -> Tensor:
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = F.normalize(features.float(), p=2, dim=-1, eps=self.eps)
            candidates, first_own_row = self._neighbour_candidates(x)
            if candidates.shape[0] < 2:
                return x.sum() * 0.0
            with torch.no_grad():
                similarity = x @ candidates.T
                own = torch.arange(x.shape[0], device=x.device)
                similarity[own, first_own_row + own] = -torch.inf
                nearest = similarity.argmax(dim=1)
            squared = (x - candidates[nearest]).pow(2).sum(dim=-1)
            distance = squared.clamp_min(self.eps**2).sqrt()
            return -torch.log(distance).mean()

    def _neighbour_candidates(self, x: Tensor) -> tuple[Tensor, int]:
        """The vectors to search (with gradients) and the row where this rank's own vectors start."""
        world = distributed.world_size()
        if not self.distributed or world == 1:
            return x, 0
        group = self.ranks_per_group or world
        if world % group:
            raise ConfigError(f"dino.koleo_distributed_replicas = {group} does not divide the world size {world}; "
                              "choose a divisor of the number of ranks, or 0 for all ranks")
        gathered = dist_fn.all_gather(x)
        rank = distributed.rank()
        first_rank = rank - rank % group
        candidates = torch.cat(gathered[first_rank:first_rank + group], dim=0)
        return candidates, (rank - first_rank) * x.shape[0]
