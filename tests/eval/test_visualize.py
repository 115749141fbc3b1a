"""Pictures: CLS attention computed by hand, PCA foreground and colours, montage sizes."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinoscale.eval.features import ArrayImages
from dinoscale.eval.visualize import (HEADER, PAD, foreground_mask, forward_with_cls_attention, pca_rgb,
                                      render_pictures, write_pictures)

def hand_cls_attention(model, images: torch.Tensor) -> torch.Tensor:
    """softmax(q_cls . k / sqrt(d)) of the last block, from the tokens entering it and its raw weights."""
    depth, heads = len(model.blocks), model.num_heads
    patches, cls, extra = model.get_intermediate_layers(images, n=[depth - 2], norm=False, return_class_token=True,
                                                        return_extra_tokens=True)[0]
    tokens = torch.cat([cls[:, None], extra, patches], dim=1)
    block = model.blocks[-1]
    y = F.layer_norm(tokens, (tokens.shape[-1],), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    qkv = y @ block.attn.qkv.weight.T + block.attn.qkv.bias
    batch, n_tokens, dim = tokens.shape
    head_dim = dim // heads
    q = qkv[..., :dim].reshape(batch, n_tokens, heads, head_dim).transpose(1, 2)
    k = qkv[..., dim:2 * dim].reshape(batch, n_tokens, heads, head_dim).transpose(1, 2)
    n_prefix = 1 + model.n_storage_tokens
    rows, cols = images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size
    if model.rope_embed is not None:
        sin, cos = model.rope_embed(rows, cols)

        def rotate(t):
            half = head_dim // 2
            turned = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
            return torch.cat([t[..., :n_prefix, :], t[..., n_prefix:, :] * cos + turned[..., n_prefix:, :] * sin], 2)

        q, k = rotate(q), rotate(k)
    scores = (q[:, :, 0:1] @ k.transpose(-2, -1))[:, :, 0] / head_dim ** 0.5
    return scores.softmax(-1)[:, :, n_prefix:].reshape(batch, heads, rows, cols)


@pytest.mark.parametrize("fields", [{}, {"pos_embed_type": "rope", "n_storage_tokens": 2}],
                         ids=["dinov2_learned", "dinov3_rope_storage"])
def test_cls_attention_matches_hand_computation(fields, tiny_backbone):
    model = tiny_backbone(**fields).eval()
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        features, attention = forward_with_cls_attention(model, images)
        expected = hand_cls_attention(model, images)
        direct = model.forward_features(images)
    assert attention.shape == (3, 2, 4, 4)
    torch.testing.assert_close(attention, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(features["x_norm_clstoken"], direct["x_norm_clstoken"])
    assert torch.all(attention.sum((-1, -2)) <= 1 + 1e-6)


def object_on_background(n_images: int, size: int, dim: int, seed: int, object_first: bool = True) -> torch.Tensor:
    """Patch features [B, size, size, D]: a central square of one feature vector on a background of another."""
    g = torch.Generator().manual_seed(seed)
    obj, background = torch.randn(2, dim, generator=g) * 3
    patches = background + 0.1 * torch.randn(n_images, size, size, dim, generator=g)
    patches[:, 2:-2, 2:-2] += obj - background
    return patches


def test_foreground_is_the_object_whatever_the_component_sign():
    patches = object_on_background(3, 8, 16, seed=0)
    expected = torch.zeros(3, 8, 8, dtype=torch.bool)
    expected[:, 2:-2, 2:-2] = True
    assert torch.equal(foreground_mask(patches), expected)
    assert torch.equal(foreground_mask(-patches), expected)  # flips the first component's sign


def test_pca_colours_follow_the_principal_directions():
    g = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(20, 3, generator=g))
    # zero-mean, mutually orthogonal coefficient columns: the sample principal axes are exactly `basis`
    raw = torch.randn(72, 3, generator=g)
    orthogonal, _ = torch.linalg.qr(raw - raw.mean(0))
    coefficients = (orthogonal * torch.tensor([50.0, 20.0, 5.0])).reshape(2, 6, 6, 3)
    patches = coefficients @ basis.T + 0.01 * torch.randn(2, 6, 6, 20, generator=g)
    rgb = pca_rgb(patches)
    assert rgb.shape == (2, 6, 6, 3) and rgb.min() >= 0 and rgb.max() <= 1
    for channel in range(3):
        corr = np.corrcoef(rgb[..., channel].flatten(), coefficients[..., channel].flatten())[0, 1]
        assert abs(corr) > 0.99
        assert rgb[..., channel].min() == 0 and rgb[..., channel].max() == 1  # min-max scaled


def test_pca_of_foreground_blacks_out_the_background():
    patches = object_on_background(2, 8, 16, seed=2)
    mask = foreground_mask(patches)
    rgb = pca_rgb(patches, mask)
    assert torch.all(rgb[~mask] == 0)
    assert rgb[mask].std(0).min() > 0.05  # foreground colours vary


def picture_images(n: int = 3) -> ArrayImages:
    rng = np.random.default_rng(0)
    images = np.zeros((n, 24, 24, 3), dtype=np.uint8)
    for i in range(n):
        images[i] = rng.integers(0, 60, 3)
        images[i, 6:18, 6:18] = rng.integers(150, 256, 3)
    return ArrayImages(images)


def _tiles(image: np.ndarray, n_rows: int, n_cols: int, tile: int):
    for r in range(n_rows):
        for c in range(n_cols):
            top, left = HEADER + PAD + r * (tile + PAD), PAD + c * (tile + PAD)
            yield r, c, image[top:top + tile, left:left + tile]


def test_montages_have_the_right_size_and_are_not_constant(tmp_path, tiny_backbone):
    model = tiny_backbone().eval()
    pictures = render_pictures(model, picture_images(3), image_size=16, n_images=3, precision="fp32",
                               device=torch.device("cpu"))
    tile = 64  # a 16 px crop is shown on a 64 px tile
    for name, n_cols in (("pca", 4), ("attention", 2 + model.num_heads)):
        image = np.asarray(Image.open(io.BytesIO(pictures[name])).convert("RGB"))
        assert image.shape == (HEADER + 3 * tile + 4 * PAD, n_cols * tile + (n_cols + 1) * PAD, 3)
        for r, c, region in _tiles(image, 3, n_cols, tile):
            if name == "pca" and c == 2:
                continue  # the foreground mask may be all on or all off for an image
            assert region.reshape(-1, 3).std(0).max() > 1.0, (name, r, c)
    assert model.training is False
    paths = write_pictures(model, picture_images(2), tmp_path, image_size=16, n_images=2,
                           device=torch.device("cpu"))
    assert Image.open(paths["pca"]).size == (4 * tile + 5 * PAD, HEADER + 2 * tile + 3 * PAD)
    assert Image.open(paths["attention"]).size == (4 * tile + 5 * PAD, HEADER + 2 * tile + 3 * PAD)
