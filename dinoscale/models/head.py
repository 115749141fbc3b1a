"""The DINO / iBOT projection head: MLP -> L2-normalised bottleneck -> prototype scores.

The prototype layer is weight-normalised as in DINO/DINOv2, written out explicitly with the
parameters `last_layer.weight_g` (row norms, (K, 1)) and `last_layer.weight_v` (directions,
(K, bottleneck)) — the key names of DINOv2 training checkpoints, which are also what the old
`torch.nn.utils.weight_norm` produced. With `freeze_norm` the norms stay at 1, so scores are
cosine similarities to the prototypes (DINO's `norm_last_layer`). `weight_norm=False` gives a
plain `last_layer.weight` as in DINOv3's recipe.
"""

from __future__ import annotations

import functools
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoscale.models.init import InitStep, run_steps
from dinoscale.models.layers import init_linear


class WeightNormLinear(nn.Module):
    """y = x (g * v / ||v||)^T row-wise, without bias."""

    def __init__(self, in_features: int, out_features: int, freeze_norm: bool = True) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.empty(out_features, 1), requires_grad=not freeze_norm)
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight_g)
        nn.init.kaiming_uniform_(self.weight_v, a=5**0.5)  # nn.Linear's default, as DINOv2 leaves it

    @property
    def weight(self) -> Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, nlayers: int = 3, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, mlp_bias: bool = True, weight_norm: bool = True,
                 freeze_norm: bool = True) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out, bias=mlp_bias))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
        self.last_layer = (WeightNormLinear(bottleneck_dim, out_dim, freeze_norm) if weight_norm
                           else nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.init_weights()

    def init_weights(self) -> None:
        run_steps(self.init_steps())

    def init_steps(self) -> Iterator[InitStep]:
        """`init_weights` one linear layer at a time (see dinoscale.models.init)."""
        linears = [m for m in self.mlp.modules() if isinstance(m, nn.Linear)]
        if isinstance(self.last_layer, nn.Linear):
            linears.append(self.last_layer)
        for linear in linears:
            yield linear, functools.partial(init_linear, linear)

    def forward(self, x: Tensor, no_last_layer: bool = False, only_last_layer: bool = False) -> Tensor:
        """Prototype scores; `no_last_layer` stops at the unit-norm bottleneck, `only_last_layer`
        starts from one."""
        if not only_last_layer:
            x = self.mlp(x)
            x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        if no_last_layer:
            return x
        return self.last_layer(x)


def build_head(in_dim: int, n_prototypes: int, hidden_dim: int, bottleneck_dim: int, nlayers: int,
               weight_norm: bool = True, freeze_norm: bool = True) -> DINOHead:
    """A DINO or iBOT head from the `dino.head_*` / `ibot.head_*` config knobs."""
    return DINOHead(in_dim, n_prototypes, nlayers=nlayers, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                    weight_norm=weight_norm, freeze_norm=freeze_norm)
