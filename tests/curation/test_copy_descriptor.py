"""The model-free copy-detection descriptor, block by block, against its definitions."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from dinoscale.curation import copy_descriptor as cd
from dinoscale.curation import embed
from dinoscale.errors import ConfigError
from dinoscale.eval.features import IMAGENET_MEAN, IMAGENET_STD


def normalised(rgb: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> the ImageNet-normalised input the embedding stage gives."""
    return (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def stripes(vertical: bool, side: int = 32, period: int = 8, colours=((0.9, 0.8, 0.1), (0.1, 0.2, 0.6))):
    coordinate = torch.arange(side)
    on = ((coordinate // (period // 2)) % 2).bool()
    mask = on[None, :].expand(side, side) if vertical else on[:, None].expand(side, side)
    low, high = (torch.tensor(c).view(3, 1, 1) for c in colours)
    return torch.where(mask, high, low)[None]


def test_colour_histogram_is_trilinear_soft_binning():
    bins = 6  # bin centres 0, 0.2, ..., 1
    flat = torch.tensor([0.2, 0.6, 1.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    histogram = cd.colour_histogram(flat, bins)
    expected = torch.zeros(bins**3)
    expected[(1 * bins + 3) * bins + 5] = 1.0
    torch.testing.assert_close(histogram[0], expected)
    between = torch.tensor([0.3, 0.6, 1.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)  # red halfway between 0.2 and 0.4
    histogram = cd.colour_histogram(between, bins)[0]
    assert torch.isclose(histogram[(1 * bins + 3) * bins + 5], torch.tensor(math.sqrt(0.5)))
    assert torch.isclose(histogram[(2 * bins + 3) * bins + 5], torch.tensor(math.sqrt(0.5)))
    assert torch.isclose(histogram.norm(), torch.tensor(1.0))


def test_gradient_histograms_see_the_orientation_of_stripes():
    bins = 8  # bin b holds orientations around b * pi / 8; vertical stripes vary along x: orientation 0
    for vertical, expected_bin in ((True, 0), (False, bins // 2)):
        luma = stripes(vertical).mean(1, keepdim=True)
        cells = cd.gradient_histograms(luma, 4, bins, sigma=1.0).view(bins, 16)
        assert (cells.argmax(0) == expected_bin).all()
    flat = torch.full((1, 1, 16, 16), 0.5)
    assert not cd.gradient_histograms(flat, 4, bins, sigma=1.0).any()


def test_gaussian_blur_is_the_separable_normalised_kernel():
    sigma, radius = 1.5, math.ceil(3 * 1.5)
    delta = torch.zeros(1, 1, 21, 21)
    delta[0, 0, 10, 10] = 1.0
    blurred = cd.gaussian_blur(delta, sigma)[0, 0]
    offsets = np.arange(-radius, radius + 1)
    taps = np.exp(-offsets**2 / (2 * sigma**2))
    taps /= taps.sum()
    np.testing.assert_allclose(blurred[10 - radius:11 + radius, 10 - radius:11 + radius].numpy(),
                               np.outer(taps, taps), atol=1e-7)
    constant = torch.full((2, 3, 9, 9), 0.7)
    torch.testing.assert_close(cd.gaussian_blur(constant, 2.0), constant)


def test_descriptor_tolerates_brightness_but_not_another_texture():
    embedder = embed.build_embedder(embed.DESCRIPTOR, 32, None)
    original = stripes(vertical=True)
    images = normalised(torch.cat([original, original * 0.9, stripes(vertical=False)]))
    rows = embedder(images)
    assert rows.shape == (3, embedder.dim)
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(3))
    layout = slice(0, 3 * cd.LAYOUT_GRID**2)
    # scaling the colours leaves the direction of the layout block as it is
    assert F.cosine_similarity(rows[0, layout], rows[1, layout], dim=0) > 1 - 1e-5
    similarity = rows @ rows[0]
    assert similarity[1] > 0.9 > similarity[2] + 0.1  # same colours and layout statistics, other orientation


@pytest.mark.parametrize("side", [8, 32, 50])
def test_descriptor_blocks_fill_the_declared_dimension(side):
    embedder = cd.CopyDescriptorEmbedder(side)
    rows = embedder(normalised(torch.rand(4, 3, side, side, generator=torch.Generator().manual_seed(side))))
    assert rows.shape == (4, embedder.dim) and torch.isfinite(rows).all()
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(4))
    layout_end = 3 * cd.LAYOUT_GRID**2
    assert F.cosine_similarity(rows[0, :layout_end], rows[1, :layout_end], dim=0) < 1


class TinyCopyModel(torch.nn.Module):
    """A stand-in for a copy-detection model such as SSCD: pooled colours through a linear map."""

    def __init__(self):
        super().__init__()
        self.project = torch.nn.Linear(12, 6)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(F.adaptive_avg_pool2d(images, 2).flatten(1))


def test_a_torchscript_copy_detection_model_from_a_file(tmp_path):
    model = TinyCopyModel().eval()
    path = tmp_path / "copy_model.pt"
    torch.jit.script(model).save(str(path))
    weights = tmp_path / "state.pth"
    torch.save(model.state_dict(), weights)
    assert embed.is_torchscript(path) and not embed.is_torchscript(weights)

    embedder = embed.build_embedder(str(path), 16, OmegaConf.create({"arch": None, "precision": "fp32"}),
                                    key="curation.embed.copy_detection", device=torch.device("cpu"))
    images = normalised(torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert embedder.dim == 6
    torch.testing.assert_close(embedder(images), F.normalize(model(images), dim=1))


def test_a_torchscript_model_must_return_one_row_per_image(tmp_path):
    path = tmp_path / "maps.pt"
    torch.jit.script(torch.nn.Conv2d(3, 4, 3)).save(str(path))
    with pytest.raises(ConfigError, match="one descriptor row"):
        embed.build_embedder(str(path), 16, OmegaConf.create({"arch": None, "precision": "fp32"}),
                             device=torch.device("cpu"))


def test_pdq_embedding_is_the_hash_as_signs():
    pdqhash = pytest.importorskip("pdqhash")
    rgb = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    rows = embed.build_embedder(embed.PDQ, 64, None)(normalised(rgb))
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(2))
    uint8 = (rgb * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    bits = [pdqhash.compute(np.ascontiguousarray(image))[0] for image in uint8]
    hamming = int((bits[0] != bits[1]).sum())
    assert abs(float(rows[0] @ rows[1]) - (1 - 2 * hamming / 256)) < 1e-5
