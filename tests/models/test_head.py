"""The DINO / iBOT head: MLP, unit-norm bottleneck, weight-normalised prototypes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinoscale.models import DINOHead, build_head


def test_bottleneck_is_unit_norm_and_scores_are_cosines_with_a_frozen_norm():
    torch.manual_seed(0)
    head = build_head(in_dim=16, n_prototypes=40, hidden_dim=24, bottleneck_dim=8, nlayers=3)
    x = torch.randn(5, 16) * 10
    bottleneck = head(x, no_last_layer=True)
    torch.testing.assert_close(bottleneck.norm(dim=-1), torch.ones(5))
    prototypes = F.normalize(head.last_layer.weight_v, dim=-1)
    scores = head(x)
    torch.testing.assert_close(scores, bottleneck @ prototypes.T)
    assert scores.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(head(bottleneck, only_last_layer=True), scores)


def test_mlp_layout_and_dinov2_key_names():
    head = build_head(in_dim=16, n_prototypes=40, hidden_dim=24, bottleneck_dim=8, nlayers=3)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {"mlp.0.weight": (24, 16), "mlp.0.bias": (24,), "mlp.2.weight": (24, 24), "mlp.2.bias": (24,),
                      "mlp.4.weight": (8, 24), "mlp.4.bias": (8,), "last_layer.weight_g": (40, 1),
                      "last_layer.weight_v": (40, 8)}
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert isinstance(DINOHead(16, 40, nlayers=1, bottleneck_dim=8).mlp, nn.Linear)


@pytest.mark.parametrize("freeze_norm", [True, False])
def test_weight_norm_matches_torch_parametrization_and_freezing_is_optional(freeze_norm):
    torch.manual_seed(0)
    head = build_head(16, 40, 24, 8, 2, freeze_norm=freeze_norm)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    reference = nn.utils.parametrizations.weight_norm(nn.Linear(8, 40, bias=False))
    with torch.no_grad():
        reference.parametrizations.weight.original0.copy_(head.last_layer.weight_g)
        reference.parametrizations.weight.original1.copy_(head.last_layer.weight_v)
    z = F.normalize(torch.randn(6, 8), dim=-1)
    torch.testing.assert_close(head.last_layer(z), reference(z))
    assert head.last_layer.weight_g.requires_grad is not freeze_norm
    head(torch.randn(6, 16)).sum().backward()
    assert (head.last_layer.weight_g.grad is None) is freeze_norm
    assert head.last_layer.weight_v.grad is not None


def test_plain_prototype_layer_without_weight_norm_for_dinov3_recipe():
    head = build_head(16, 40, 24, 8, 3, weight_norm=False)
    assert isinstance(head.last_layer, nn.Linear) and "last_layer.weight" in head.state_dict()
    assert head(torch.randn(3, 16)).shape == (3, 40)
