"""Loading official DINOv2/DINOv3 backbone files and dinoscale exports.

The official layouts are written here from the documented key names and shapes of the reference
checkpoints (facebookresearch/dinov2 and dinov3 hub backbones), not from the model's state_dict.
"""

import re

import pytest
import torch

from dinoscale.errors import CheckpointError
from dinoscale.models import PUBLISHED, detect_spec, load_backbone, preset_spec, save_backbone
from dinoscale.models.loading import EXPORT_FORMAT

from tiny_run import TINY_STUDENT


def official_layout(generation: str, dim: int, depth: int, heads: int, *, patch: int, img: int = 224,
                    n_storage: int = 0, ffn: str = "mlp", ffn_hidden: int = 0, qkv_bias: bool = True,
                    mask_k_bias: bool = False, local_cls_norm: bool = False) -> dict[str, tuple]:
    """Key -> shape of an official backbone checkpoint."""
    shapes: dict[str, tuple] = {"cls_token": (1, 1, dim), "mask_token": (1, dim),
                                "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
                                "norm.weight": (dim,), "norm.bias": (dim,)}
    if generation == "dinov2":
        shapes["pos_embed"] = (1, 1 + (img // patch) ** 2, dim)
        if n_storage:
            shapes["register_tokens"] = (1, n_storage, dim)
    else:
        shapes["rope_embed.periods"] = (dim // heads // 4,)
        if n_storage:
            shapes["storage_tokens"] = (1, n_storage, dim)
        if local_cls_norm:
            shapes.update({"local_cls_norm.weight": (dim,), "local_cls_norm.bias": (dim,)})
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "attn.qkv.weight": (3 * dim, dim),
                       b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,), b + "ls1.gamma": (dim,),
                       b + "norm2.weight": (dim,), b + "norm2.bias": (dim,), b + "ls2.gamma": (dim,)})
        if qkv_bias:
            shapes[b + "attn.qkv.bias"] = (3 * dim,)
            if mask_k_bias:
                shapes[b + "attn.qkv.bias_mask"] = (3 * dim,)
        if ffn == "mlp":
            shapes.update({b + "mlp.fc1.weight": (ffn_hidden, dim), b + "mlp.fc1.bias": (ffn_hidden,),
                           b + "mlp.fc2.weight": (dim, ffn_hidden), b + "mlp.fc2.bias": (dim,)})
        elif generation == "dinov2":  # fused SwiGLU: w12 stacks W1 and W2
            shapes.update({b + "mlp.w12.weight": (2 * ffn_hidden, dim), b + "mlp.w12.bias": (2 * ffn_hidden,)})
        else:
            for w in ("w1", "w2"):
                shapes.update({b + f"mlp.{w}.weight": (ffn_hidden, dim), b + f"mlp.{w}.bias": (ffn_hidden,)})
        if ffn != "mlp":
            shapes.update({b + "mlp.w3.weight": (dim, ffn_hidden), b + "mlp.w3.bias": (dim,)})
    return shapes


def random_weights(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights = {k: torch.randn(s, generator=gen) * 0.2 for k, s in shapes.items()}
    for key in weights:
        if key.endswith("bias_mask"):  # DINOv3: the key third of the qkv bias is zeroed
            third = weights[key].shape[0] // 3
            weights[key] = torch.cat([torch.ones(third), torch.zeros(third), torch.ones(third)])
        if key == "rope_embed.periods":
            weights[key] = 100.0 ** (torch.arange(s := weights[key].shape[0]) / s)
    return weights


TINY_V2 = dict(TINY_STUDENT, n_storage_tokens=4, ffn_layer="swiglu", interpolate_offset=0.0, interpolate_antialias=True)
TINY_V3 = dict(TINY_STUDENT, pos_embed_type="rope", n_storage_tokens=4, mask_k_bias=True, norm_layer="layernormbf16",
               untie_global_and_local_cls_norm=True)
TINY_LAYOUTS = {
    "dinov2": (TINY_V2, official_layout("dinov2", 32, 2, 2, patch=4, img=16, n_storage=4, ffn="swiglu",
                                        ffn_hidden=88)),  # int(128 * 2/3) = 85 -> 88
    "dinov3": (TINY_V3, official_layout("dinov3", 32, 2, 2, patch=4, n_storage=4, ffn_hidden=128,
                                        mask_k_bias=True, local_cls_norm=True)),
}


def save(obj, path):
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("generation", ["dinov2", "dinov3"])
def test_official_layout_loads_strictly_and_reloads_identically(tmp_path, generation):
    fields, shapes = TINY_LAYOUTS[generation]
    weights = random_weights(shapes)
    path = save(weights, tmp_path / "official.pth")
    model = load_backbone(path, arch=fields).eval()
    loaded = model.state_dict()
    assert set(loaded) == set(weights)
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    x = torch.randn(2, 3, 16, 12)
    again = load_backbone(path, arch=fields).eval()
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
        out = model.forward_features(x)
    assert out["x_norm_patchtokens"].shape == (2, 12, 32) and torch.isfinite(out["x_prenorm"]).all()


@pytest.mark.parametrize("name, layout", [
    ("dinov2_vits14_reg", official_layout("dinov2", 384, 12, 6, patch=14, img=518, n_storage=4, ffn_hidden=1536)),
    ("dinov3_vits16plus", official_layout("dinov3", 384, 12, 6, patch=16, n_storage=4, ffn="swiglu",
                                          ffn_hidden=1536, mask_k_bias=True)),
])
def test_generation_and_size_are_detected_from_a_real_size_file(tmp_path, name, layout):
    path = save(random_weights(layout), tmp_path / f"{name}.pth")
    model = load_backbone(path).eval()
    assert model.spec.arch == name
    x = torch.randn(1, 3, 2 * model.patch_size, 2 * model.patch_size)
    with torch.no_grad():
        assert torch.equal(model(x), load_backbone(path).eval()(x))


def _layout_of(name: str, **changes) -> dict[str, tuple]:
    """The documented layout of a published preset, from its hub definition."""
    s = {**PUBLISHED[name], **changes}
    dim = s["embed_dim"]
    hidden = int(dim * s.get("ffn_ratio", 4.0))
    ffn = s.get("ffn_layer", "mlp")
    if ffn != "mlp":
        align = 64 if ffn == "swiglu64" else 8
        hidden = -(-int(hidden * 2 / 3) // align) * align
    generation = name.split("_")[0]
    return official_layout(generation, dim, s["depth"], s["num_heads"], patch=s["patch_size"], img=s["img_size"],
                           n_storage=s.get("n_storage_tokens", 0), ffn=ffn, ffn_hidden=hidden,
                           qkv_bias=s.get("qkv_bias", True), mask_k_bias=s.get("mask_k_bias", False),
                           local_cls_norm=s.get("untie_global_and_local_cls_norm", False))


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_every_published_layout_is_recognised(name):
    state_dict = {k: torch.empty(s, device="meta") for k, s in _layout_of(name).items()}
    assert detect_spec(state_dict).arch == name


def test_satellite_vitl_with_untied_local_norm_is_recognised():
    state_dict = {k: torch.empty(s, device="meta")
                  for k, s in _layout_of("dinov3_vitl16", untie_global_and_local_cls_norm=True).items()}
    spec = detect_spec(state_dict)
    assert spec.arch == "dinov3_vitl16" and spec.untie_global_and_local_cls_norm


def test_dinov2_file_at_another_resolution_is_recognised():
    state_dict = {k: torch.empty(s, device="meta") for k, s in _layout_of("dinov2_vitb14", img_size=224).items()}
    spec = detect_spec(state_dict)
    assert (spec.arch, spec.img_size, spec.patch_size) == ("dinov2_vitb14", 224, 14)


def test_checkpoint_of_another_architecture_fails_with_the_documented_message(tmp_path):
    fields, shapes = TINY_LAYOUTS["dinov2"]
    path = save(random_weights(shapes), tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError) as err:
        load_backbone(path, arch="dinov2_vitb14_reg")
    message = str(err.value)
    assert f"{path}: the weights do not fit preset 'dinov2_vitb14_reg' (dinov2 layout)" in message
    assert "missing keys ['blocks.0.mlp.fc1.weight'" in message and "(+140 more)" in message
    assert "unexpected keys ['blocks.0.mlp.w12.weight'" in message
    assert "shape mismatches ['cls_token: file (1, 1, 32) vs model (1, 1, 768)'" in message
    assert "Pass arch=<preset> matching the file" in message

    v3_path = save(random_weights(TINY_LAYOUTS["dinov3"][1]), tmp_path / "v3.pth")
    mixed_up = r"missing keys \['register_tokens', 'pos_embed'.*unexpected keys \['rope_embed.periods'"
    with pytest.raises(CheckpointError, match=mixed_up):
        load_backbone(v3_path, arch=TINY_V2)
    with pytest.raises(CheckpointError, match="no dinov3 preset has embed_dim=32 and depth=2"):
        load_backbone(v3_path)


def test_files_that_are_not_backbones_are_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read as a PyTorch weights file"):
        load_backbone(tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="holds no state dict of tensors"):
        load_backbone(save({"epoch": 3}, tmp_path / "meta.pth"))
    with pytest.raises(CheckpointError, match="no 'cls_token' entry"):
        load_backbone(save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pth"))


def test_export_round_trip_keeps_official_keys_and_outputs(tmp_path):
    fields, shapes = TINY_LAYOUTS["dinov3"]
    model = load_backbone(save(random_weights(shapes), tmp_path / "official.pth"), arch=fields).eval()
    model.set_attn_backend("math")
    path = tmp_path / "export" / "backbone.pth"
    save_backbone(model, path)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == EXPORT_FORMAT and set(payload["model"]) == set(shapes)
    assert payload["arch_config"]["untie_global_and_local_cls_norm"] is True
    assert "attn_backend" not in payload["arch_config"]
    reloaded = load_backbone(path).eval()
    assert reloaded.spec.replace(attn_backend="math") == model.spec
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), atol=1e-6, rtol=1e-6)


def test_training_checkpoint_teacher_backbone_is_loaded(tmp_path):
    fields, shapes = TINY_LAYOUTS["dinov2"]
    weights = random_weights(shapes)
    # DINOv2 training checkpoints chunk the blocks for FSDP; with one block per chunk block i is `blocks.i.i.`
    chunked = {re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{m[1]}.{m[1]}.", k): v for k, v in weights.items()}
    assert "blocks.1.1.attn.qkv.weight" in chunked
    teacher = {f"backbone.{k}": v for k, v in chunked.items()} | {"dino_head.last_layer.weight_g": torch.ones(8, 1)}
    model = load_backbone(save({"teacher": teacher, "iteration": 10}, tmp_path / "ckpt.pth"), arch=fields)
    assert all(torch.equal(model.state_dict()[k], w) for k, w in weights.items())


def test_explicit_arch_at_another_resolution_resizes_the_position_embedding(tmp_path):
    fields, _ = TINY_LAYOUTS["dinov2"]
    big = dict(fields, img_size=32)
    shapes = official_layout("dinov2", 32, 2, 2, patch=4, img=32, n_storage=4, ffn="swiglu", ffn_hidden=88)
    path = save(random_weights(shapes), tmp_path / "at32.pth")
    original = load_backbone(path, arch=big).eval()
    resized = load_backbone(path, arch=fields).eval()
    assert resized.pos_embed.shape == (1, 17, 32)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(resized(x), original(x))


def test_preset_spec_of_official_file_matches_the_hub_definition():
    spec = preset_spec("dinov3_vit7b16")
    assert (spec.embed_dim, spec.depth, spec.num_heads, spec.ffn_ratio) == (4096, 40, 32, 3.0)
    assert (spec.qkv_bias, spec.mask_k_bias, spec.n_storage_tokens) == (False, True, 4)
    assert (spec.norm_layer, spec.ffn_layer) == ("layernormbf16", "swiglu64")
    assert spec.untie_global_and_local_cls_norm
