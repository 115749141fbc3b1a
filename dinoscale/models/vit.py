"""One VisionTransformer for both DINOv2 (learned position embedding) and DINOv3 (RoPE).

Token layout: [CLS, storage/register tokens, patches]. Parameter names are the official
checkpoints' (see `BackboneSpec.generation`), so official weights load with
`load_state_dict(strict=True)` and `state_dict()` is loadable by the reference code.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from dinoscale.models.attention import check_backend
from dinoscale.models.block import Block, Rope
from dinoscale.models.init import InitStep, run_steps
from dinoscale.models.layers import LayerScale, PatchEmbed, RMSNorm, init_linear, make_norm
from dinoscale.models.pos_embed import interpolate_pos_embed
from dinoscale.models.rope import RopePositionEmbedding
from dinoscale.models.spec import BackboneSpec

Features = dict[str, Any]


class VisionTransformer(nn.Module):
    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        check_backend(spec.attn_backend)
        self.spec = spec
        self.embed_dim = self.num_features = spec.embed_dim
        self.num_heads = spec.num_heads
        self.n_blocks = spec.depth
        self.patch_size = spec.patch_size
        self.n_storage_tokens = spec.n_storage_tokens
        dim = spec.embed_dim

        self.patch_embed = PatchEmbed(spec.patch_size, spec.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if spec.n_storage_tokens:
            # DINOv2 calls them register tokens, DINOv3 storage tokens; the name is the checkpoint key.
            name = "register_tokens" if spec.generation == "dinov2" else "storage_tokens"
            self.register_parameter(name, nn.Parameter(torch.zeros(1, spec.n_storage_tokens, dim)))
        self.rope_embed: RopePositionEmbedding | None = None
        if spec.pos_embed_type == "learned":
            grid = spec.img_size // spec.patch_size
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        else:
            self.rope_embed = RopePositionEmbedding(
                dim, spec.num_heads, base=spec.pos_embed_rope_base, min_period=spec.pos_embed_rope_min_period,
                max_period=spec.pos_embed_rope_max_period, normalize_coords=spec.pos_embed_rope_normalize_coords,
                shift_coords=spec.pos_embed_rope_shift_coords, jitter_coords=spec.pos_embed_rope_jitter_coords,
                rescale_coords=spec.pos_embed_rope_rescale_coords)

        if spec.drop_path_uniform or spec.depth == 1:
            drop_rates = [spec.drop_path_rate] * spec.depth
        else:  # linear ramp from 0 to drop_path_rate (computed in Python: this may run under a meta device)
            drop_rates = [spec.drop_path_rate * i / (spec.depth - 1) for i in range(spec.depth)]
        self.blocks = nn.ModuleList(
            Block(dim, spec.num_heads, ffn_layer=spec.ffn_layer, ffn_ratio=spec.ffn_ratio,
                  norm_layer=spec.norm_layer, layerscale=spec.layerscale, drop_path=rate,
                  qkv_bias=spec.qkv_bias, proj_bias=spec.proj_bias, ffn_bias=spec.ffn_bias,
                  mask_k_bias=spec.mask_k_bias, fused_swiglu=spec.generation == "dinov2",
                  attn_backend=spec.attn_backend)
            for rate in drop_rates)
        # `norm` serves all tokens, or only patches when the CLS/storage norms are untied.
        self.norm = make_norm(spec.norm_layer, dim)
        if spec.untie_cls_and_patch_norms:
            self.cls_norm = make_norm(spec.norm_layer, dim)
        if spec.untie_global_and_local_cls_norm:
            self.local_cls_norm = make_norm(spec.norm_layer, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.init_weights()

    # ------------------------------------------------------------------ parameters
    @property
    def storage_tokens_param(self) -> nn.Parameter | None:
        """The register/storage tokens, whatever their checkpoint name."""
        return getattr(self, "register_tokens", None) if self.spec.generation == "dinov2" \
            else getattr(self, "storage_tokens", None)

    def init_weights(self) -> None:
        """DINOv2/DINOv3 initialisation; also turns a model materialised from the meta device into a usable one."""
        run_steps(self.init_steps())

    def init_steps(self) -> Iterator[InitStep]:
        """`init_weights` one module at a time, in its RNG order (see dinoscale.models.init)."""
        yield self, self._init_tokens
        if self.rope_embed is not None:
            yield self.rope_embed, self.rope_embed.reset_parameters
        for module in self.modules():
            if isinstance(module, nn.Linear):
                yield module, functools.partial(init_linear, module)
            elif isinstance(module, PatchEmbed):
                yield module.proj, module.reset_parameters
            elif isinstance(module, (nn.LayerNorm, RMSNorm, LayerScale)):
                yield module, module.reset_parameters

    def _init_tokens(self) -> None:
        token_std = 1e-6 if self.spec.generation == "dinov2" else 0.02
        nn.init.normal_(self.cls_token, std=token_std)
        if self.storage_tokens_param is not None:
            nn.init.normal_(self.storage_tokens_param, std=token_std)
        if self.rope_embed is None:
            trunc_normal_(self.pos_embed, std=0.02)
        nn.init.zeros_(self.mask_token)

    def set_attn_backend(self, backend: str) -> None:
        """Switch every block to `auto`, `xformers`, `sdpa` or `math` attention."""
        check_backend(backend)
        self.spec = self.spec.replace(attn_backend=backend)
        for block in self.blocks:
            block.attn.backend = backend

    # ------------------------------------------------------------------ tokens
    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        """Images (B, C, H, W) -> tokens (B, 1 + n_storage + h*w, D) and the patch grid (h, w).

        Masked patches (masks: (B, h*w) bool) are replaced by the mask token before the position
        embedding is added, as in iBOT/DINOv2.
        """
        batch = x.shape[0]
        rows, cols = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        patches = self.patch_embed(x)
        if masks is not None:
            patches = torch.where(masks.flatten(1).unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        cls_token = self.cls_token
        if self.rope_embed is None:
            pos = interpolate_pos_embed(self.pos_embed, rows, cols, self.spec.interpolate_offset,
                                        self.spec.interpolate_antialias)
            cls_token = cls_token + pos[:, :1]
            patches = patches + pos[:, 1:]
        prefix = [cls_token.expand(batch, -1, -1)]
        if self.storage_tokens_param is not None:
            prefix.append(self.storage_tokens_param.expand(batch, -1, -1))
        return torch.cat((*prefix, patches), dim=1), (rows, cols)

    def _rope_tables(self, grids: Sequence[tuple[int, int]]) -> list[Rope]:
        if self.rope_embed is None:
            return [None] * len(grids)
        return [self.rope_embed(rows, cols) for rows, cols in grids]

    def _run_blocks(self, tokens: list[Tensor], grids: list[tuple[int, int]],
                    keep: Sequence[int] = ()) -> tuple[list[Tensor], list[list[Tensor]]]:
        """Tokens after the last block, and after each block listed in `keep`."""
        augments = self.rope_embed is not None and self.rope_embed.augments
        ropes = self._rope_tables(grids)
        kept = []
        for i, block in enumerate(self.blocks):
            if augments:  # as in DINOv3, every block draws its own coordinate augmentation
                ropes = self._rope_tables(grids)
            tokens = block(tokens, ropes)
            if i in keep:
                kept.append(tokens)
        return tokens, kept

    # ------------------------------------------------------------------ outputs
    def _normalise(self, x: Tensor, is_local: bool) -> tuple[Tensor, Tensor]:
        """Final norm(s) -> (normalised CLS + storage tokens, normalised patch tokens)."""
        n_prefix = 1 + self.n_storage_tokens
        if self.spec.untie_global_and_local_cls_norm and is_local:
            prefix_norm = self.local_cls_norm
        elif self.spec.untie_cls_and_patch_norms:
            prefix_norm = self.cls_norm
        else:
            x_norm = self.norm(x)
            return x_norm[:, :n_prefix], x_norm[:, n_prefix:]
        return prefix_norm(x[:, :n_prefix]), self.norm(x[:, n_prefix:])

    def forward_features(self, x: Tensor | list[Tensor],
                         masks: Tensor | None | list[Tensor | None] = None) -> Features | list[Features]:
        """Per input: x_norm_clstoken, x_storage_tokens (alias x_norm_regtokens), x_norm_patchtokens,
        x_prenorm, masks.

        A list of inputs (e.g. global and local crops) runs through the blocks together; inputs of
        the same resolution are concatenated into one batch. In training, entries after the first
        are local crops (they use `local_cls_norm` when that norm is untied).
        """
        if isinstance(x, Tensor):
            return self._forward_features_list([x], [masks])[0]
        if masks is None:
            masks = [None] * len(x)
        if isinstance(masks, Tensor) or len(masks) != len(x):
            raise TypeError(f"with a list of {len(x)} inputs, give masks as a list of as many entries (None: unmasked)")
        return self._forward_features_list(list(x), list(masks))

    def _forward_features_list(self, xs: list[Tensor], masks: list[Tensor | None]) -> list[Features]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(xs):
            groups.setdefault(tuple(image.shape[-2:]), []).append(i)
        tokens, grids = [], []
        for members in groups.values():
            images = torch.cat([xs[i] for i in members]) if len(members) > 1 else xs[members[0]]
            group_tokens, grid = self.prepare_tokens_with_masks(images, _group_masks(xs, masks, members))
            tokens.append(group_tokens)
            grids.append(grid)
        tokens, _ = self._run_blocks(tokens, grids)

        per_input: list[Tensor] = [None] * len(xs)  # type: ignore[list-item]  # filled below
        for members, group_tokens in zip(groups.values(), tokens):
            for i, part in zip(members, group_tokens.split([xs[i].shape[0] for i in members])):
                per_input[i] = part
        outputs = []
        for i, x_prenorm in enumerate(per_input):
            prefix, patches = self._normalise(x_prenorm, is_local=self.training and i > 0)
            outputs.append({
                "x_norm_clstoken": prefix[:, 0],
                "x_storage_tokens": prefix[:, 1:],
                "x_norm_regtokens": prefix[:, 1:],
                "x_norm_patchtokens": patches,
                "x_prenorm": x_prenorm,
                "masks": masks[i],
            })
        return outputs

    def get_intermediate_layers(self, x: Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True,
                                return_extra_tokens: bool = False) -> tuple:
        """Patch tokens of the last `n` blocks (or of the blocks listed in `n`), as in the reference.

        reshape: (B, D, h, w) maps instead of (B, h*w, D); return_class_token / return_extra_tokens
        add the CLS / storage tokens to each entry.
        """
        wanted = range(self.n_blocks - n, self.n_blocks) if isinstance(n, int) else n
        missing = [i for i in wanted if not 0 <= i < self.n_blocks]
        if missing:
            raise ValueError(f"blocks {missing} do not exist; the model has {self.n_blocks}")
        tokens, grid = self.prepare_tokens_with_masks(x)
        _, taken = self._run_blocks([tokens], [grid], keep=wanted)
        n_prefix = 1 + self.n_storage_tokens
        results = []
        for (out,) in taken:
            if norm:
                prefix, patches = self._normalise(out, is_local=False)
            else:
                prefix, patches = out[:, :n_prefix], out[:, n_prefix:]
            if reshape:
                patches = patches.reshape(x.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous()
            entry = (patches,)
            if return_class_token:
                entry += (prefix[:, 0],)
            if return_extra_tokens:
                entry += (prefix[:, 1:],)
            results.append(entry if len(entry) > 1 else patches)
        return tuple(results)

    def forward(self, x: Tensor | list[Tensor], masks: Tensor | None | list[Tensor | None] = None,
                is_training: bool = False) -> Tensor | list[Tensor] | Features | list[Features]:
        """The normalised CLS token(s); with `is_training=True` the full `forward_features` output."""
        features = self.forward_features(x, masks)
        if is_training:
            return features
        if isinstance(features, list):
            return [f["x_norm_clstoken"] for f in features]
        return features["x_norm_clstoken"]


def _group_masks(xs: list[Tensor], masks: list[Tensor | None], members: list[int]) -> Tensor | None:
    """Masks of a resolution group, concatenated; inputs without a mask get an all-False one."""
    given = [masks[i].flatten(1) for i in members if masks[i] is not None]
    if not given:
        return None
    if len(members) == 1:
        return given[0]
    n_patches = given[0].shape[1]
    parts = [masks[i].flatten(1) if masks[i] is not None
             else torch.zeros(xs[i].shape[0], n_patches, dtype=torch.bool, device=xs[i].device) for i in members]
    return torch.cat(parts)
