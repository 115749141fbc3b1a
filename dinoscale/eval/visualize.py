"""Pictures of what a backbone sees: PCA of patch features as RGB, CLS attention maps, and the
dense probes' predicted masks and depth next to the ground truth.

PCA (as in the DINOv2 figure): the first principal component of all patches of a handful of
images separates foreground from background (threshold on it, with the sign chosen so the
image border is background); a second PCA of the foreground patches alone gives the colours.
Attention (as in DINO): softmax(q_cls k^T / sqrt(d)) of every head of the last block, with
q and k recomputed from that block's own qkv projection on its captured input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw
from torch import Tensor, nn

from dinoscale.errors import DataError
from dinoscale.eval.features import LabelledImages, check_image_size, eval_crop, to_model_input
from dinoscale.models.attention import apply_rope_to_patches
from dinoscale.utils.device import default_device, inference_autocast
from dinoscale.utils.io import write_bytes
from dinoscale.utils.report import image_png

PAD = 2
HEADER = 12
MIN_TILE, MAX_TILE = 64, 224


@torch.no_grad()
def forward_with_cls_attention(model: nn.Module, images: Tensor) -> tuple[dict, Tensor]:
    """`forward_features(images)` and the last block's CLS-to-patch attention [B, heads, h, w] (float32)."""
    attn = model.blocks[-1].attn
    captured: dict = {}

    def keep_input(module: nn.Module, args: tuple) -> None:
        captured["x"], captured["rope"] = args[0], args[1] if len(args) > 1 else None

    handle = attn.register_forward_pre_hook(keep_input)
    try:
        features = model.forward_features(images)
    finally:
        handle.remove()
    x, rope = captured["x"].float(), captured["rope"]
    batch, n_tokens, dim = x.shape
    heads = attn.num_heads
    with torch.autocast(x.device.type, enabled=False):
        q, k, _ = attn.qkv(x).view(batch, n_tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            q, k = apply_rope_to_patches(q, k, *rope)
        weights = ((q[:, :, :1] * (dim // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    n_prefix = 1 + getattr(model, "n_storage_tokens", 0)
    rows, cols = images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size
    return features, weights[:, :, 0, n_prefix:].reshape(batch, heads, rows, cols)


def principal_components(x: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Mean [D] and the top `n` principal directions [n, D] of rows `x` (zero rows when fewer exist)."""
    mean = x.mean(dim=0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    components = torch.zeros(n, x.shape[1], dtype=x.dtype)
    components[:min(n, len(vh))] = vh[:n]
    return mean, components


def _border(rows: int, cols: int) -> Tensor:
    border = torch.ones(rows, cols, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    return border


def foreground_mask(patches: Tensor, threshold: float = 0.0) -> Tensor:
    """[B, h, w, D] patch features -> [B, h, w] bool: first principal component above `threshold` std.

    The component's sign is arbitrary; it is flipped when most border patches would be foreground.
    """
    batch, rows, cols, dim = patches.shape
    flat = patches.reshape(-1, dim).float()
    mean, component = principal_components(flat, 1)
    score = (flat - mean) @ component[0]
    score = (score / score.std().clamp_min(1e-12)).reshape(batch, rows, cols)
    border = _border(rows, cols).expand(batch, rows, cols)
    if (score[border] > threshold).float().mean() > 0.5:
        score = -score
    return score > threshold


def pca_rgb(patches: Tensor, mask: Tensor | None = None) -> Tensor:
    """[B, h, w, D] -> [B, h, w, 3] in [0, 1]: three principal components (fitted on the masked
    patches, all when `mask` is None) min-max scaled to colours; unmasked patches are black."""
    batch, rows, cols, dim = patches.shape
    flat = patches.reshape(-1, dim).float()
    keep = torch.ones(len(flat), dtype=torch.bool) if mask is None else mask.reshape(-1).cpu()
    if keep.sum() < 3:  # too few foreground patches to fit colours
        keep = torch.ones_like(keep)
    mean, components = principal_components(flat[keep], 3)
    projected = (flat - mean) @ components.T
    low, high = projected[keep].min(dim=0).values, projected[keep].max(dim=0).values
    rgb = ((projected - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    rgb[~keep] = 0
    return rgb.reshape(batch, rows, cols, 3)


def tile_size(image_size: int) -> int:
    """Montage tiles show crops at their own size, within [64, 224] pixels."""
    return min(max(image_size, MIN_TILE), MAX_TILE)


def _tile(array: np.ndarray, size: int) -> Image.Image:
    """A float [h, w, 3] array in [0, 1] as a `size` x `size` image (nearest neighbour, patches stay sharp)."""
    image = Image.fromarray((array * 255).round().astype(np.uint8), "RGB")
    return image.resize((size, size), Image.NEAREST)


def _heatmap(weights: Tensor, size: int) -> Image.Image:
    """An attention map [h, w], min-max scaled, in the viridis colour map."""
    w = weights.float().cpu()
    w = (w - w.min()) / (w.max() - w.min()).clamp_min(1e-12)
    return _tile(colormaps["viridis"](w.numpy())[..., :3], size)


def montage(rows: Sequence[Sequence[Image.Image]], titles: Sequence[str], tile: int) -> Image.Image:
    """Square tiles in a grid with a one-line title per column, on white."""
    n_cols = len(titles)
    width = n_cols * tile + (n_cols + 1) * PAD
    height = HEADER + len(rows) * tile + (len(rows) + 1) * PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((PAD + c * (tile + PAD), 0), title, fill="black")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            canvas.paste(image.resize((tile, tile)), (PAD + c * (tile + PAD), HEADER + PAD + r * (tile + PAD)))
    return canvas


def _pick_images(images: LabelledImages, n: int) -> list[Image.Image]:
    """Up to `n` readable images spread evenly over the pool (so several classes show)."""
    picked = []
    for index in np.unique(np.linspace(0, len(images) - 1, min(n, len(images))).round().astype(int)):
        image = images.load(int(index))
        if image is not None:
            picked.append(image)
    if not picked:
        raise DataError("none of the images picked for the pictures could be read")
    return picked


def render_pictures(model: nn.Module, images: LabelledImages, image_size: int = 224, n_images: int = 6,
                    foreground_threshold: float = 0.0, device: torch.device | None = None,
                    precision: str = "auto", resize: str = "center_crop") -> dict[str, bytes]:
    """Two PNG montages, one row per image, tiles of `tile_size(image_size)` pixels:
    `pca` (image | PCA of all patches | foreground | PCA of the foreground) and
    `attention` (image | mean over heads | one map per head)."""
    check_image_size(model, image_size)
    device = device or default_device()
    was_training = model.training
    model = model.to(device).eval()
    crops = [eval_crop(image_size, resize)(image) for image in _pick_images(images, n_images)]
    batch = torch.stack([to_model_input()(crop) for crop in crops]).to(device)
    with inference_autocast(device, precision):
        features, attention = forward_with_cls_attention(model, batch)
    model.train(was_training)
    rows, cols = image_size // model.patch_size, image_size // model.patch_size
    patches = features["x_norm_patchtokens"].float().cpu().reshape(len(crops), rows, cols, -1)
    foreground = foreground_mask(patches, foreground_threshold)
    rgb_all, rgb_foreground = pca_rgb(patches).numpy(), pca_rgb(patches, foreground).numpy()
    mask_rgb = foreground[..., None].expand(-1, -1, -1, 3).float().numpy()

    tile = tile_size(image_size)
    pca_rows = [[crop, _tile(rgb_all[i], tile), _tile(mask_rgb[i], tile), _tile(rgb_foreground[i], tile)]
                for i, crop in enumerate(crops)]
    attention = attention.cpu()
    attention_rows = [[crop, _heatmap(attention[i].mean(0), tile)] + [_heatmap(head, tile) for head in attention[i]]
                      for i, crop in enumerate(crops)]
    head_titles = [f"h{h}" for h in range(attention.shape[1])]
    return {"pca": image_png(montage(pca_rows, ["image", "pca", "fg", "pca fg"], tile)),
            "attention": image_png(montage(attention_rows, ["image", "mean", *head_titles], tile))}


def write_pictures(model: nn.Module, images: LabelledImages, out_dir: str | Path, **kwargs) -> dict[str, Path]:
    """`render_pictures` saved as `pca.png` and `attention.png` in `out_dir`."""
    paths = {}
    for name, png in render_pictures(model, images, **kwargs).items():
        paths[name] = Path(out_dir) / f"{name}.png"
        write_bytes(paths[name], png)
    return paths


def _class_colours(mask: np.ndarray, ignore_index: int) -> np.ndarray:
    """[H, W] class indices -> [H, W, 3] in [0, 1]: tab20 colours, white where ignored."""
    rgb = colormaps["tab20"](np.where(mask == ignore_index, 0, mask) % 20)[..., :3]
    rgb[mask == ignore_index] = 1.0
    return rgb


def _depth_colours(depth: np.ndarray, low: float, high: float, valid: np.ndarray | None = None) -> np.ndarray:
    """[H, W] depth -> [H, W, 3] in [0, 1]: viridis from `low` (near, dark) to `high` (far); black where not valid."""
    rgb = colormaps["viridis"](np.clip((depth - low) / max(high - low, 1e-12), 0, 1))[..., :3]
    if valid is not None:
        rgb[~valid] = 0.0
    return rgb


def render_dense_pictures(pictures: Sequence[dict], ignore_index: int = 255, min_depth: float = 0.0,
                          max_depth: float = float("inf"), tile: int = MIN_TILE) -> bytes:
    """One row per image: image | true mask | predicted mask | true depth | predicted depth (the
    columns that exist). Depth shares one colour scale per row, from the true depth's range.
    `pictures`: {"image": RGB uint8, "mask": (true, predicted), "depth": (true, predicted)}."""
    titles = ["image"] + (["mask", "predicted"] if "mask" in pictures[0] else []) + \
        (["depth", "predicted"] if "depth" in pictures[0] else [])
    rows = []
    for picture in pictures:
        row = [Image.fromarray(picture["image"]).resize((tile, tile), Image.BICUBIC)]
        if "mask" in picture:
            row += [_tile(_class_colours(m, ignore_index), tile) for m in picture["mask"]]
        if "depth" in picture:
            true, predicted = picture["depth"]
            valid = np.isfinite(true) & (true > min_depth) & (true < max_depth)
            low, high = (float(true[valid].min()), float(true[valid].max())) if valid.any() else (0.0, 1.0)
            row += [_tile(_depth_colours(true, low, high, valid), tile), _tile(_depth_colours(predicted, low, high),
                                                                               tile)]
        rows.append(row)
    return image_png(montage(rows, titles, tile))
