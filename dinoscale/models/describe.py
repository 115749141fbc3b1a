"""The preset table behind `dinoscale models`: parameters and GFLOPs per image of every preset.

GFLOPs follow fvcore's convention (one fused multiply-add = one FLOP, the numbers ViT papers
quote) at the preset's native resolution. Blocks are identical, so fvcore counts a one-block
copy of the model (uninitialised memory, math attention so the attention matmuls are seen)
and the total is embed + depth x block + final norm; this keeps the 7B preset to one block in
memory. Parameters are counted on the meta device.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from dinoscale.models.presets import PRESETS, PUBLISHED, preset_spec
from dinoscale.models.spec import BackboneSpec
from dinoscale.models.vit import VisionTransformer

COLUMNS = ("name", "family", "patch_size", "img_size", "embed_dim", "depth", "num_heads", "ffn_layer",
           "n_storage_tokens", "pos_embed_type", "params_m", "gflops")


def count_params(spec: BackboneSpec) -> int:
    with torch.device("meta"):
        model = VisionTransformer(spec)
    return sum(p.numel() for p in model.parameters())


def count_gflops(spec: BackboneSpec) -> float:
    """fvcore FLOPs of one image at the spec's native resolution, in units of 1e9."""
    with warnings.catch_warnings():  # fvcore decorates with the deprecated torch.jit.script
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    with torch.device("meta"):
        one_block = VisionTransformer(spec.replace(depth=1, drop_path_rate=0.0, attn_backend="math"))
    one_block = one_block.to_empty(device="cpu").eval()
    image = torch.zeros(1, spec.in_chans, spec.img_size, spec.img_size)
    with torch.no_grad():
        analysis = FlopCountAnalysis(one_block, image).set_op_handle("aten::baddbmm", _baddbmm_flops)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)  # elementwise ops are not counted
        total, block = analysis.total(), analysis.by_module()["blocks.0"]
    return (total + (spec.depth - 1) * block) / 1e9


def _baddbmm_flops(inputs: list, outputs: list) -> int:
    """fvcore has no handle for baddbmm (the math attention's q k^T): count it as the bmm it contains."""
    from fvcore.nn.jit_handles import bmm_flop_jit

    return bmm_flop_jit(inputs[1:3], outputs)


def describe_presets(names: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per preset (all by default): its architecture, parameter count and GFLOPs."""
    rows = []
    for name in names or list(PRESETS):
        spec = preset_spec(name)
        family = "size" if name not in PUBLISHED else spec.generation
        rows.append({"name": name, "family": family, **{c: getattr(spec, c) for c in COLUMNS[2:-2]},
                     "params_m": count_params(spec) / 1e6, "gflops": count_gflops(spec)})
    return rows


def format_presets_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text, column-aligned table of `describe_presets` rows."""
    headers = {"n_storage_tokens": "storage", "pos_embed_type": "pos_embed", "params_m": "params (M)",
               "gflops": "GFLOPs", "patch_size": "patch", "img_size": "res", "embed_dim": "dim",
               "num_heads": "heads", "ffn_layer": "ffn"}
    columns = list(rows[0]) if rows else list(COLUMNS)

    def cell(value: Any) -> str:
        return f"{value:,.1f}" if isinstance(value, float) else str(value)

    table = [[headers.get(c, c) for c in columns]] + [[cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(text.rjust(w) if j >= 2 else text.ljust(w) for j, (text, w) in enumerate(zip(line, widths)))
             for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)
