"""The VisionTransformer: token layout, masks, position embeddings, RoPE, attention backends, list inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from dinoscale.config import load_config
from dinoscale.errors import ConfigError
from dinoscale.models import PUBLISHED, VisionTransformer, attention, build_backbone, preset_spec, resolve_backend
from dinoscale.models.attention import apply_rope_to_patches, check_backend, xformers_installed
from dinoscale.models.block import _add_residual_on_subset
from dinoscale.models.rope import rope_sincos

from tiny_run import TINY_STUDENT

TINY = [f"student.{name}={value}" for name, value in TINY_STUDENT.items()]
ROPE = ["student.pos_embed_type=rope", "student.n_storage_tokens=4", "student.mask_k_bias=true"]


def tiny(*overrides: str, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return build_backbone(load_config(None, [*TINY, *overrides]).student)


def randomise(model: VisionTransformer) -> VisionTransformer:
    """Non-trivial values everywhere (zero-initialised biases and tokens would hide mistakes)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.5 if "gamma" not in name else 1.0)
    return model


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("name", list(PUBLISHED))
def test_every_published_preset_gives_reference_token_counts_on_meta(name):
    spec = preset_spec(name)
    with torch.device("meta"):
        model = VisionTransformer(spec).eval()
        out = model.forward_features(torch.empty(2, 3, spec.img_size, spec.img_size))
    grid = spec.img_size // spec.patch_size
    n_storage = 4 if name.startswith("dinov3") or name.endswith("_reg") else 0
    dim = spec.embed_dim
    assert out["x_norm_clstoken"].shape == (2, dim)
    assert out["x_storage_tokens"].shape == (2, n_storage, dim)
    assert out["x_norm_regtokens"].shape == (2, n_storage, dim)
    assert out["x_norm_patchtokens"].shape == (2, grid * grid, dim)
    assert out["x_prenorm"].shape == (2, 1 + n_storage + grid * grid, dim)
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("name", ["dinov2_vits14_reg", "dinov3_vits16plus"])
def test_small_presets_run_for_real_at_another_resolution(name):
    torch.manual_seed(0)
    model = VisionTransformer(preset_spec(name)).eval()
    p = model.patch_size
    with torch.no_grad():
        out = model.forward_features(torch.randn(2, 3, 2 * p, 3 * p))
        cls = model(torch.randn(2, 3, 2 * p, 2 * p))
    assert out["x_norm_patchtokens"].shape == (2, 6, 384)
    assert cls.shape == (2, 384) and torch.isfinite(cls).all()


def test_image_not_a_whole_number_of_patches_is_a_config_error():
    with pytest.raises(ConfigError, match="not a whole number of 4x4 patches"):
        tiny().forward_features(torch.randn(1, 3, 18, 16))


# ----------------------------------------------------------------------------- tokens, masks, positions
@pytest.mark.parametrize("overrides", [["student.n_storage_tokens=2"], ROPE])
def test_masked_patches_carry_the_mask_token(overrides):
    model = randomise(tiny(*overrides)).eval()
    x = torch.randn(3, 3, 16, 16)
    masks = torch.rand(3, 16) < 0.5
    masks[0, 0] = True
    tokens, grid = model.prepare_tokens_with_masks(x, masks)
    # Patch embedding and token layout computed from the definitions.
    patches = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=4)
    patches = patches.flatten(2).transpose(1, 2)  # row-major patch order
    expected = torch.where(masks.unsqueeze(-1), model.mask_token.unsqueeze(0), patches)
    n_storage = model.n_storage_tokens
    cls = model.cls_token.expand(3, -1, -1)
    if model.rope_embed is None:  # DINOv2: the position embedding is added after the mask token
        expected = expected + model.pos_embed[:, 1:]
        cls = cls + model.pos_embed[:, :1]
    assert grid == (4, 4)
    torch.testing.assert_close(tokens[:, :1], cls)
    torch.testing.assert_close(tokens[:, 1:1 + n_storage], model.storage_tokens_param.expand(3, -1, -1))
    torch.testing.assert_close(tokens[:, 1 + n_storage:], expected)
    out = model.forward_features(x, masks)
    assert out["masks"] is masks


def test_native_resolution_uses_the_position_embedding_unchanged():
    model = randomise(tiny("student.interpolate_offset=0.1")).eval()
    x = torch.randn(2, 3, 16, 16)
    tokens, _ = model.prepare_tokens_with_masks(x)
    assert torch.equal(tokens[:, 1:], model.patch_embed(x) + model.pos_embed[:, 1:])
    assert torch.equal(tokens[:, :1], (model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1))


@pytest.mark.parametrize("offset, antialias", [(0.1, False), (0.0, True)])
def test_position_embedding_is_resized_bicubically_with_rows_and_columns_kept_apart(offset, antialias):
    model = tiny(f"student.interpolate_offset={offset}", f"student.interpolate_antialias={antialias}").eval()
    side = 4
    with torch.no_grad():  # embedding value = row index of the patch, in every channel and column
        rows = torch.arange(side, dtype=torch.float32).repeat_interleave(side)
        model.pos_embed[0, 1:] = rows.unsqueeze(1).expand(-1, 32)
        model.pos_embed[0, 0] = 7.0
    x = torch.randn(1, 3, 4 * 6, 4 * 3)  # 6 rows, 3 columns of patches
    tokens, grid = model.prepare_tokens_with_masks(x)
    pos = tokens[0, 1:] - model.patch_embed(x)[0]
    pos = pos.reshape(6, 3, 32)
    assert grid == (6, 3)
    torch.testing.assert_close(pos, pos[:, :1].expand(-1, 3, -1))  # constant along columns
    assert (pos[1:, 0, 0] > pos[:-1, 0, 0]).all()  # increasing along rows
    torch.testing.assert_close(tokens[0, 0] - model.cls_token[0, 0], torch.full((32,), 7.0))
    # Reference definition (DINOv2): bicubic with scale (n + offset) / M, or to size n when the offset is 0.
    grid_in = model.pos_embed[:, 1:].reshape(1, side, side, 32).permute(0, 3, 1, 2)
    kwargs = {"scale_factor": ((6 + offset) / side, (3 + offset) / side)} if offset else {"size": (6, 3)}
    ref = F.interpolate(grid_in, mode="bicubic", antialias=antialias, **kwargs).permute(0, 2, 3, 1)[0]
    torch.testing.assert_close(pos, ref)


# ----------------------------------------------------------------------------- RoPE
def _pair_rotation_logits(q, k, coords, periods):
    """q.k logits after rotating channel pairs (j, j + d/2) by 2*pi*coord[axis(j)]/period(j), written with
    complex numbers: they depend on the coordinate differences only."""
    d = q.shape[-1]
    quarter = d // 4
    zq = torch.complex(q[..., : d // 2].double(), q[..., d // 2:].double())
    zk = torch.complex(k[..., : d // 2].double(), k[..., d // 2:].double())
    axis = torch.arange(d // 2) // quarter
    period = periods.double()[torch.arange(d // 2) % quarter]
    diff = coords.double()[:, None, :] - coords.double()[None, :, :]  # (N, N, 2)
    phase = 2 * math.pi * diff[..., axis] / period  # (N, N, d/2)
    return (zq[:, None, :] * zk[None, :, :].conj() * torch.exp(1j * phase)).real.sum(-1)


def test_rope_coordinates_follow_the_definition():
    model = tiny(*ROPE).eval()
    coords = model.rope_embed.coords(3, 5)
    rows = (torch.arange(3) + 0.5) / 3 * 2 - 1
    cols = (torch.arange(5) + 0.5) / 5 * 2 - 1
    expected = torch.stack([rows.repeat_interleave(5), cols.repeat(3)], dim=1)
    torch.testing.assert_close(coords, expected)
    torch.testing.assert_close(model.rope_embed.periods, 100.0 ** (2 * torch.arange(4) / 8))  # head dim 16


def test_rope_logits_match_the_rotation_definition_and_ignore_a_common_shift():
    model = tiny(*ROPE).eval()
    periods = model.rope_embed.periods
    torch.manual_seed(1)
    n_patches, n_prefix, d = 12, 5, 16
    q, k = torch.randn(2, 1, 1, n_prefix + n_patches, d).unbind(0)
    coords = model.rope_embed.coords(3, 4)
    expected = _pair_rotation_logits(q[0, 0, n_prefix:], k[0, 0, n_prefix:], coords, periods)
    for shift in (torch.zeros(2), torch.tensor([0.37, -1.3])):
        sin, cos = rope_sincos(coords + shift, periods)
        q_rot, k_rot = apply_rope_to_patches(q, k, sin, cos)
        logits = q_rot[0, 0] @ k_rot[0, 0].T
        torch.testing.assert_close(logits[n_prefix:, n_prefix:].double(), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits[:n_prefix], q[0, 0, :n_prefix] @ k_rot[0, 0].T)  # CLS/storage not rotated
        torch.testing.assert_close(k_rot[0, 0, :n_prefix], k[0, 0, :n_prefix])


def test_rope_training_shift_leaves_attention_logits_unchanged():
    model = tiny(*ROPE, "student.pos_embed_rope_shift_coords=2.0")
    q, k = torch.randn(2, 1, 1, 16, 16).unbind(0)
    model.eval()
    sin, cos = model.rope_embed(4, 4)
    q0, k0 = apply_rope_to_patches(q, k, sin, cos)
    model.train()
    torch.manual_seed(3)
    sin_s, cos_s = model.rope_embed(4, 4)
    assert not torch.allclose(sin_s, sin)  # the coordinates did move
    q1, k1 = apply_rope_to_patches(q, k, sin_s, cos_s)
    torch.testing.assert_close(q1 @ k1.transpose(-1, -2), q0 @ k0.transpose(-1, -2), atol=1e-4, rtol=1e-4)


def test_rope_rescale_is_drawn_per_block_in_training_only():
    model = tiny(*ROPE, "student.pos_embed_rope_rescale_coords=2.0")
    calls = []
    model.rope_embed.register_forward_hook(lambda m, args, out: calls.append(out[0]))
    x = torch.randn(2, 3, 16, 16)
    model.train()
    model.forward_features(x)
    assert len(calls) == 1 + model.n_blocks and not torch.allclose(calls[1], calls[2])
    calls.clear()
    model.eval()
    model.forward_features(x)
    assert len(calls) == 1


# ----------------------------------------------------------------------------- attention backends
def test_backends_agree_in_float32():
    torch.manual_seed(0)
    qkv = torch.randn(2, 37, 3, 3, 16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided views, as the model passes them
    reference = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
    for backend in ("math", "sdpa", "auto"):
        torch.testing.assert_close(attention(q, k, v, backend), reference, atol=1e-5, rtol=1e-5)


def test_backends_agree_in_bfloat16_within_its_precision():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 37, 16).unbind(0)
    reference = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
    q16, k16, v16 = (t.bfloat16() for t in (q, k, v))
    for backend in ("math", "sdpa", "auto"):
        out = attention(q16, k16, v16, backend)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("overrides", [[], ROPE])
def test_model_outputs_agree_across_backends(overrides):
    model = randomise(tiny(*overrides)).eval()
    x = [torch.randn(2, 3, 16, 16), torch.randn(3, 3, 8, 8)]
    outputs = {}
    for backend in ("math", "sdpa"):
        model.set_attn_backend(backend)
        outputs[backend] = model.forward_features(x)
    for a, b in zip(outputs["math"], outputs["sdpa"]):
        scale = a["x_prenorm"].abs().max().item()
        torch.testing.assert_close(a["x_prenorm"], b["x_prenorm"], atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.skipif(not (xformers_installed() and torch.cuda.is_available()),
                    reason="xFormers' kernels need an installed xformers and a CUDA device")
def test_xformers_agrees_with_sdpa_on_cuda():
    q, k, v = torch.randn(3, 2, 4, 50, 32, device="cuda").unbind(0)
    torch.testing.assert_close(attention(q, k, v, "xformers"), attention(q, k, v, "sdpa"), atol=1e-5, rtol=1e-5)


def test_automatic_backend_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, torch.float32) == "sdpa"
    assert resolve_backend("auto", cpu, torch.bfloat16) == "math"
    assert resolve_backend("auto", cuda, torch.bfloat16) == ("xformers" if xformers_installed() else "sdpa")
    assert resolve_backend("math", cuda, torch.float32) == "math"


@pytest.mark.skipif(xformers_installed(), reason="xformers is installed here")
def test_asking_for_missing_xformers_is_a_config_error():
    with pytest.raises(ConfigError, match="xFormers is not installed"):
        check_backend("xformers")
    with pytest.raises(ConfigError, match="xFormers is not installed"):
        tiny("student.attn_backend=xformers")


# ----------------------------------------------------------------------------- lists, norms, depth
def test_list_input_batches_each_resolution_once_and_matches_separate_calls():
    model = randomise(tiny(*ROPE)).eval()
    xs = [torch.randn(2, 3, 16, 16), torch.randn(3, 3, 8, 8), torch.randn(1, 3, 16, 16)]
    masks = [torch.rand(2, 16) < 0.5, None, None]
    embeds = []
    model.patch_embed.register_forward_hook(lambda m, args, out: embeds.append(args[0].shape[0]))
    together = model.forward_features(xs, masks)
    assert sorted(embeds) == [3, 3]  # one pass for both 16 px inputs, one for the 8 px input
    for x, m, out in zip(xs, masks, together):
        alone = model.forward_features(x, m)
        for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(out[key], alone[key], atol=1e-5, rtol=1e-5)
        assert out["masks"] is m


def test_untied_local_cls_norm_applies_to_local_crops_in_training_only():
    model = randomise(tiny(*ROPE, "student.untie_global_and_local_cls_norm=true"))
    xs = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    model.train()
    torch.manual_seed(0)
    global_out, local_out = model.forward_features(xs)
    for out, norm in ((global_out, model.norm), (local_out, model.local_cls_norm)):
        expected = F.layer_norm(out["x_prenorm"][:, 0], (32,), norm.weight, norm.bias, eps=1e-6)
        torch.testing.assert_close(out["x_norm_clstoken"], expected)
    model.eval()
    local_eval = model.forward_features(xs)[1]
    expected = F.layer_norm(local_eval["x_prenorm"][:, 0], (32,), model.norm.weight, model.norm.bias, eps=1e-6)
    torch.testing.assert_close(local_eval["x_norm_clstoken"], expected)


def test_stochastic_depth_adds_the_scaled_residual_to_a_random_subset():
    torch.manual_seed(0)
    x = torch.zeros(8, 3, 4)
    out = _add_residual_on_subset(x, lambda t: torch.ones_like(t), drop_rate=0.25)
    touched = out.flatten(1).abs().sum(1) > 0
    assert touched.sum() == 6  # int(8 * 0.75) samples get the branch
    torch.testing.assert_close(out[touched], torch.full((6, 3, 4), 8 / 6))  # so the expectation is unchanged


def test_drop_path_only_acts_in_training():
    model = randomise(tiny("student.drop_path_rate=0.5"))
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    a, b = model(x), model(x)
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(0)
    c = model(x)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_block_computes_the_pre_norm_transformer_definition(ffn):
    model = randomise(tiny(f"student.ffn_layer={ffn}")).eval()
    block = model.blocks[0]
    x = torch.randn(2, 7, 32)
    h = F.layer_norm(x, (32,), block.norm1.weight, block.norm1.bias, eps=1e-6)
    q, k, v = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias).reshape(2, 7, 3, 2, 16).permute(2, 0, 3, 1, 4)
    heads = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
    attn = heads.transpose(1, 2).reshape(2, 7, 32) @ block.attn.proj.weight.T + block.attn.proj.bias
    x1 = x + block.ls1.gamma * attn
    h = F.layer_norm(x1, (32,), block.norm2.weight, block.norm2.bias, eps=1e-6)
    if ffn == "mlp":
        hidden = F.gelu(h @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
        out = hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
    else:  # DINOv2's fused layout: the first half of w12 is the gate
        gate, value = (h @ block.mlp.w12.weight.T + block.mlp.w12.bias).chunk(2, dim=-1)
        out = (F.silu(gate) * value) @ block.mlp.w3.weight.T + block.mlp.w3.bias
    expected = x1 + block.ls2.gamma * out
    torch.testing.assert_close(block(x), expected, atol=1e-4, rtol=1e-4)


def test_drop_path_ramps_linearly_unless_uniform():
    ramp = tiny("student.drop_path_rate=0.3", "student.drop_path_uniform=false", "student.depth=4")
    assert [b.drop_path for b in ramp.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert [b.drop_path for b in tiny("student.drop_path_rate=0.3").blocks] == [0.3, 0.3]


def test_intermediate_layers_match_forward_features():
    model = randomise(tiny("student.n_storage_tokens=2")).eval()
    x = torch.randn(2, 3, 16, 8)
    last = model.forward_features(x)
    layers = model.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
    assert len(layers) == 2
    maps, cls = layers[-1]
    assert maps.shape == (2, 32, 4, 2)
    torch.testing.assert_close(cls, last["x_norm_clstoken"])
    torch.testing.assert_close(maps[:, :, 3, 1], last["x_norm_patchtokens"][:, 3 * 2 + 1])
    (first,) = model.get_intermediate_layers(x, n=[0], norm=False)
    assert first.shape == (2, 8, 32)
    with pytest.raises(ValueError, match="blocks \\[5\\] do not exist"):
        model.get_intermediate_layers(x, n=[5])


def test_backward_reaches_every_trained_parameter():
    model = tiny(*ROPE, "student.ffn_layer=swiglu")
    model.train()
    outs = model.forward_features([torch.randn(2, 3, 16, 16), torch.randn(4, 3, 8, 8)],
                                  [torch.rand(2, 16) < 0.5, None])
    sum(o["x_norm_clstoken"].sum() + o["x_norm_patchtokens"].sum() for o in outs).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []


# ----------------------------------------------------------------------------- config mapping
def test_preset_defaults_and_config_overrides():
    cfg = load_config(None, ["student.arch=dinov3_vit7b16"])
    with torch.device("meta"):
        big = build_backbone(cfg.student)
    assert big.spec.ffn_layer == "swiglu64" and big.spec.qkv_bias is False and hasattr(big, "local_cls_norm")
    assert big.spec.patch_size == 16 and big.spec.n_storage_tokens == 4 and big.rope_embed is not None
    model = tiny("student.arch=dinov3_vits16plus")
    assert model.spec.ffn_layer == "swiglu" and model.spec.ffn_ratio == 6.0 and model.embed_dim == 32
    assert model.spec.pos_embed_type == "rope" and hasattr(model, "storage_tokens")
    model = tiny("student.arch=dinov3_vits16plus", "student.ffn_layer=mlp", "student.n_storage_tokens=0")
    assert model.spec.ffn_layer == "mlp" and model.n_storage_tokens == 0
    assert model.spec.norm_layer == "layernormbf16"


def test_unknown_arch_and_bad_shapes_are_config_errors():
    with pytest.raises(ConfigError, match="unknown student.arch 'vit_smal'; did you mean 'vit_small'"):
        tiny("student.arch=vit_smal")
    with pytest.raises(ConfigError, match="not divisible by num_heads=3"):
        tiny("student.num_heads=3")
    with pytest.raises(ConfigError, match="head width divisible by 4"):
        tiny(*ROPE, "student.embed_dim=36", "student.num_heads=6")
