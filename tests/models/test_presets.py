"""Presets: parameter counts against the architecture definition and the published numbers; the preset table."""

import pytest

from dinoscale.models import PRESETS, describe_presets, format_presets_table, preset_spec
from dinoscale.models.describe import count_params

# Published sizes (DINOv2 model cards / hub models, DINOv3 paper and model card).
PUBLISHED_PARAMS = {
    "dinov2_vits14": 22.06e6,
    "dinov2_vitb14": 86.58e6,
    "dinov2_vitl14": 304.37e6,
    "dinov2_vitg14": 1136.48e6,
    "dinov3_vith16plus": 840e6,
    "dinov3_vit7b16": 6716e6,
}


def swiglu_width(hidden: int, align: int) -> int:
    d = int(hidden * 2 / 3)
    return (d + align - 1) // align * align


def expected_params(name: str) -> int:
    """Parameters of a preset counted from the ViT definition: patch projection, CLS / mask / storage tokens,
    learned position embedding (DINOv2) and per block 2 norms, qkv, proj, 2 LayerScales and the FFN."""
    s = PRESETS[name]
    dim, depth = s["embed_dim"], s["depth"]
    patch = s.get("patch_size", 16)
    img = s.get("img_size", 224)
    hidden = int(dim * s.get("ffn_ratio", 4.0))
    ffn = s.get("ffn_layer", "mlp")
    if ffn == "mlp":
        ffn_params = 2 * dim * hidden + hidden + dim
    else:
        width = swiglu_width(hidden, {"swiglu": 8, "swiglu64": 64}[ffn])
        ffn_params = 3 * dim * width + 2 * width + dim
    qkv_bias = 3 * dim if s.get("qkv_bias", True) else 0
    block = 4 * dim + (3 * dim * dim + qkv_bias) + (dim * dim + dim) + 2 * dim + ffn_params
    tokens = (2 + s.get("n_storage_tokens", 0)) * dim
    if s.get("pos_embed_type", "learned") == "learned":
        tokens += (1 + (img // patch) ** 2) * dim
    final_norms = 2 * dim * (2 if s.get("untie_global_and_local_cls_norm") else 1)
    return 3 * patch * patch * dim + dim + tokens + depth * block + final_norms


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_matches_the_architecture_definition(name):
    assert count_params(preset_spec(name)) == expected_params(name)


@pytest.mark.parametrize("name, published", list(PUBLISHED_PARAMS.items()))
def test_parameter_count_is_within_one_percent_of_the_published_size(name, published):
    assert abs(count_params(preset_spec(name)) - published) / published < 0.01


def test_exact_published_counts_of_dinov2_and_7b():
    assert count_params(preset_spec("dinov2_vits14")) == 22_056_576
    assert count_params(preset_spec("dinov2_vitg14")) == 1_136_480_768
    assert round(count_params(preset_spec("dinov3_vit7b16")) / 1e6) == 6716


def expected_gmacs(name: str) -> float:
    """Multiply-accumulates of one image at native resolution: patch projection, and per block the qkv,
    projection and FFN matmuls plus the two N x N attention products."""
    spec = preset_spec(name)
    dim, grid = spec.embed_dim, spec.img_size // spec.patch_size
    n = 1 + spec.n_storage_tokens + grid * grid
    hidden = int(dim * spec.ffn_ratio)
    ffn = 2 * dim * hidden if spec.ffn_layer == "mlp" else 3 * dim * swiglu_width(hidden, 8)
    block = n * (4 * dim * dim + ffn) + 2 * n * n * dim
    return (grid * grid * 3 * spec.patch_size**2 * dim + spec.depth * block) / 1e9


def test_preset_table_counts_flops_like_the_definition():
    rows = describe_presets(["dinov2_vits14", "dinov3_vits16plus"])
    assert [r["name"] for r in rows] == ["dinov2_vits14", "dinov3_vits16plus"]
    assert [r["family"] for r in rows] == ["dinov2", "dinov3"]
    for row in rows:
        assert row["params_m"] == pytest.approx(expected_params(row["name"]) / 1e6)
        # fvcore also counts the norms, which the matmul-only definition leaves out (< 1%)
        assert row["gflops"] == pytest.approx(expected_gmacs(row["name"]), rel=0.01)
    table = format_presets_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].split()[:2] == ["name", "family"]
    assert lines[2].startswith("dinov2_vits14") and "22.1" in lines[2]
