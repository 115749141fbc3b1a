"""A deterministic stand-in for an uncurated web pool, so the demo needs no download.

Twelve procedurally drawn classes (shapes, textures, patterns) on varied backgrounds, at
random positions, scales and colours; long-tailed class frequencies; injected exact and
near duplicates (JPEG re-encode, resize, small crop, brightness shift) whose ground-truth
groups are recorded; a few corrupt files. Labels are written beside the pool, never inside
it, so curation cannot see them. Balanced labelled splits of the same classes are written
for evaluation, with per-pixel ground truth for the dense probes: a class mask of each
image's object (VOC-style: 0 background, class index + 1 on the object) and a depth map.

Depth follows what the image shows, as in a photograph: the background is a ground plane
whose depth grows from the bottom row (4 m) to the top row (8 m), and the object stands in
front of it at the depth where an object of fixed physical size appears as large as it is
drawn (depth inversely proportional to its drawn radius, or to its box side for the
textures: 1.2-3.3 m). Masks and depth come from the drawing's own geometry, so they take no
random draws: the images are the same as without them.

Layout written under `out_dir`:
    pool/            img_000000.jpg ... (flat; or pool/*.tar shards with format="shards")
    pool_labels.json {key: class index}  (-1 for corrupt files)
    duplicates.json  [{"source": key, "copies": [{"key": k, "kind": "exact|jpeg|resize|crop|brightness"}]}]
    corrupt.json     [keys]
    eval_train/CLASS/*.png, eval_test/CLASS/*.png   balanced, disjoint from the pool
    eval_train_segmentation/CLASS/*.png, ...        uint8 masks, same stems as the images
    eval_train_depth/CLASS/*.png, ...               16-bit depth in millimetres, same stems
    synthetic.json   the generator's parameters and counts
"""

from __future__ import annotations

import io
import math
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

from dinoscale.utils.io import atomic_dir, write_json

CLASS_NAMES = [
    "disc", "square", "triangle", "h_stripes", "v_stripes", "checker",
    "rings", "cross", "dots", "diag_stripes", "star", "crescent",
]
DUPLICATE_KINDS = ("exact", "jpeg", "resize", "crop", "brightness")
TEXTURE_CLASSES = ("h_stripes", "v_stripes", "diag_stripes", "checker", "dots")
SEGMENTATION_CLASSES = ["background", *CLASS_NAMES]  # mask value = index here
DEPTH_PNG_SCALE = 1000  # 16-bit depth PNGs hold millimetres (NYU's convention)
GROUND_NEAR, GROUND_FAR = 4.0, 8.0  # depth of the bottom and top image rows, metres
OBJECT_DEPTH_AT_RADIUS = 0.6  # an object drawn with radius r (as a share of the image side) is 0.6 / r m away
EDIT_KINDS = (*DUPLICATE_KINDS, "caption", "overlay", "pad", "flip")  # the real-image set uses them all
CAPTIONS = ("(c) 2024 stock photo", "SALE -50%", "follow us", "wallpaper HD", "shared via chat")


@dataclass(frozen=True)
class SyntheticSpec:
    n_images: int = 3000
    image_size: int = 64
    n_classes: int = 12
    imbalance: float = 40.0          # largest class / smallest class frequency
    duplicate_fraction: float = 0.06  # fraction of pool images that get 1-3 copies
    n_corrupt: int = 6
    eval_per_class: int = 40         # per split, per class
    seed: int = 0


def class_frequencies(n_classes: int, imbalance: float) -> np.ndarray:
    """Geometric long tail: frequency ratio between first and last class is `imbalance`."""
    ratio = imbalance ** (-1.0 / max(n_classes - 1, 1))
    weights = ratio ** np.arange(n_classes)
    return weights / weights.sum()


def _random_colour(rng: np.random.Generator, avoid: np.ndarray | None = None) -> np.ndarray:
    while True:
        colour = rng.integers(0, 256, 3)
        if avoid is None or np.abs(colour - avoid).sum() > 200:
            return colour


def _background(rng: np.random.Generator, size: int) -> tuple[Image.Image, np.ndarray]:
    """Gradient, noise or flat backgrounds in random colours."""
    base = _random_colour(rng).astype(np.float64)
    kind = rng.integers(0, 3)
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind == 0:
        other = _random_colour(rng).astype(np.float64)
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy + 1) / 2
        arr = base * (1 - t[..., None]) + other * t[..., None]
    elif kind == 1:
        arr = base + rng.normal(0, 25, (size, size, 3))
    else:
        arr = np.broadcast_to(base, (size, size, 3)).copy()
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB"), base


def _pattern_mask(kind: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of a texture-like class's painted pixels and of the random box they fill."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    period = rng.uniform(size / 10, size / 5)
    phase = rng.uniform(0, period)
    if kind == "h_stripes":
        mask = ((yy + phase) % period) < period / 2
    elif kind == "v_stripes":
        mask = ((xx + phase) % period) < period / 2
    elif kind == "diag_stripes":
        mask = ((xx + yy + phase) % period) < period / 2
    elif kind == "checker":
        mask = ((((xx + phase) // period) + ((yy + phase) // period)) % 2) == 0
    elif kind == "dots":
        cx, cy = (xx + phase) % period - period / 2, (yy + phase) % period - period / 2
        mask = cx**2 + cy**2 < (period / 4) ** 2
    else:
        raise ValueError(kind)
    box = np.zeros_like(mask)
    lo = rng.integers(0, size // 4, 2)
    hi = rng.integers(3 * size // 4, size + 1, 2)
    box[lo[1]:hi[1], lo[0]:hi[0]] = True
    return mask & box, box


def _star(cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = rotation + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


@dataclass
class DrawnObject:
    """What `draw_class` drew besides the image: the object's pixels and its apparent radius
    (half the box side for textures), as a share of the image side."""

    mask: np.ndarray
    radius: float


def draw_class(label: int, rng: np.random.Generator, size: int) -> Image.Image:
    """One image of class `label` with random background, colour, position and scale."""
    return draw_class_with_object(label, rng, size)[0]


def draw_class_with_object(label: int, rng: np.random.Generator, size: int) -> tuple[Image.Image, DrawnObject]:
    """`draw_class` and the object it drew. The mask is the object's extent: a shape's filled area
    (a crescent without its bite, rings as their outer disc) or a texture's box."""
    img, bg = _background(rng, size)
    colour = tuple(int(c) for c in _random_colour(rng, avoid=bg))
    name = CLASS_NAMES[label]
    if name in TEXTURE_CLASSES:
        painted, box = _pattern_mask(name, size, rng)
        arr = np.asarray(img).copy()
        arr[painted] = colour
        rows, cols = box.any(axis=1).sum(), box.any(axis=0).sum()
        return Image.fromarray(arr, "RGB"), DrawnObject(box, (rows + cols) / 4 / size)
    draw = ImageDraw.Draw(img)
    extent = Image.new("L", img.size, 0)
    mask = ImageDraw.Draw(extent)
    r = rng.uniform(0.18, 0.38) * size
    cx, cy = rng.uniform(r, size - r, 2)
    rotation = rng.uniform(0, 2 * math.pi)
    disc = [cx - r, cy - r, cx + r, cy + r]
    if name == "disc":
        draw.ellipse(disc, fill=colour)
        mask.ellipse(disc, fill=1)
    elif name == "square":
        corners = [(cx + r * math.cos(rotation + k * math.pi / 2), cy + r * math.sin(rotation + k * math.pi / 2))
                   for k in range(4)]
        draw.polygon(corners, fill=colour)
        mask.polygon(corners, fill=1)
    elif name == "triangle":
        corners = [(cx + r * math.cos(rotation + k * 2 * math.pi / 3), cy + r * math.sin(rotation + k * 2 * math.pi / 3))
                   for k in range(3)]
        draw.polygon(corners, fill=colour)
        mask.polygon(corners, fill=1)
    elif name == "rings":
        width = max(1, int(r / 4))
        for radius in (r, r * 0.55):
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=colour, width=width)
        mask.ellipse(disc, fill=1)
    elif name == "cross":
        w = r * 0.3
        for bar in ([cx - r, cy - w, cx + r, cy + w], [cx - w, cy - r, cx + w, cy + r]):
            draw.rectangle(bar, fill=colour)
            mask.rectangle(bar, fill=1)
    elif name == "star":
        draw.polygon(_star(cx, cy, r, rotation), fill=colour)
        mask.polygon(_star(cx, cy, r, rotation), fill=1)
    elif name == "crescent":
        draw.ellipse(disc, fill=colour)
        mask.ellipse(disc, fill=1)
        dx, dy = 0.5 * r * math.cos(rotation), 0.5 * r * math.sin(rotation)
        bg_colour = tuple(int(c) for c in np.asarray(img)[int(np.clip(cy + dy, 0, size - 1)), 0])
        bite = [cx + dx - r * 0.85, cy + dy - r * 0.85, cx + dx + r * 0.85, cy + dy + r * 0.85]
        draw.ellipse(bite, fill=bg_colour)
        mask.ellipse(bite, fill=0)
    drawn = DrawnObject(np.asarray(extent, dtype=bool), r / size)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.6))), drawn


def segmentation_mask(label: int, drawn: DrawnObject) -> np.ndarray:
    """uint8 mask: 0 background, `label + 1` on the object (the index in SEGMENTATION_CLASSES)."""
    return np.where(drawn.mask, label + 1, 0).astype(np.uint8)


def depth_map(drawn: DrawnObject) -> np.ndarray:
    """float32 depth in metres: the ground plane, and the object at OBJECT_DEPTH_AT_RADIUS / radius."""
    size = drawn.mask.shape[0]
    ground = np.linspace(GROUND_FAR, GROUND_NEAR, size, dtype=np.float32)[:, None].repeat(drawn.mask.shape[1], 1)
    return np.where(drawn.mask, np.float32(OBJECT_DEPTH_AT_RADIUS / drawn.radius), ground).astype(np.float32)


def _save_depth_png(depth: np.ndarray, path: Path) -> None:
    Image.fromarray(np.round(depth * DEPTH_PNG_SCALE).astype(np.uint16)).save(path)


def _encode(img: Image.Image, fmt: str, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def near_duplicate(kind: str, img: Image.Image, source_bytes: bytes, rng: np.random.Generator) -> bytes:
    """The bytes of a copy of `img` made by one edit of EDIT_KINDS (the synthetic pool uses DUPLICATE_KINDS).

    exact: the source bytes; jpeg: re-encoded at quality 55-80; resize: 70-90% of the side; crop: a
    margin of 3-8% of each side cut off and resized back; brightness: scaled by 0.9-1.1; caption: a dark
    band with white text over the bottom eighth; overlay: a half-transparent logo over 12-20% of the side
    in a corner; pad: a black or white border, letterboxed or pillarboxed to a 4:3 or 16:9 frame; flip: mirrored
    left to right. Every copy but `exact` is a JPEG of quality 92.
    """
    width, height = img.size
    if kind == "exact":
        return source_bytes
    if kind == "jpeg":
        return _encode(img, "jpg", quality=int(rng.integers(55, 80)))
    if kind == "resize":
        scale = rng.uniform(0.7, 0.9)
        return _encode(img.resize((max(1, int(width * scale)), max(1, int(height * scale))), Image.BICUBIC), "jpg")
    if kind == "crop":
        margin = rng.uniform(0.03, 0.08)
        dx, dy = max(1, int(width * margin)), max(1, int(height * margin))
        return _encode(img.crop((dx, dy, width - dx, height - dy)).resize((width, height), Image.BICUBIC), "jpg")
    if kind == "brightness":
        return _encode(ImageEnhance.Brightness(img).enhance(rng.uniform(0.9, 1.1)), "jpg")
    if kind == "caption":
        return _encode(_caption(img, rng), "jpg")
    if kind == "overlay":
        return _encode(_overlay(img, rng), "jpg")
    if kind == "pad":
        return _encode(_letterbox(img, rng), "jpg")
    if kind == "flip":
        return _encode(img.transpose(Image.FLIP_LEFT_RIGHT), "jpg")
    raise ValueError(kind)


def _caption(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    width, height = img.size
    band = max(4, height // 8)
    out = img.convert("RGBA")
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    draw.rectangle((0, height - band, width, height), fill=(0, 0, 0, 170))
    text = CAPTIONS[int(rng.integers(len(CAPTIONS)))]
    draw.text((band // 4, height - band), text, fill=(255, 255, 255, 255), font=ImageFont.load_default(size=band * 0.8))
    return Image.alpha_composite(out, layer).convert("RGB")


def _overlay(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    width, height = img.size
    side = max(3, int(min(width, height) * rng.uniform(0.12, 0.2)))
    pad = max(1, side // 4)
    corner = int(rng.integers(4))
    x = pad if corner % 2 == 0 else width - side - pad
    y = pad if corner < 2 else height - side - pad
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    draw.ellipse((x, y, x + side, y + side), fill=(*colour, 150))
    draw.ellipse((x + side // 4, y + side // 4, x + 3 * side // 4, y + 3 * side // 4), fill=(255, 255, 255, 150))
    return Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")


def _letterbox(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A border of 4-10% of the side all round, then bars to a 4:3 or 16:9 frame (rotated for wide pictures)."""
    width, height = img.size
    border = int(min(width, height) * rng.uniform(0.04, 0.1))
    aspect = (4 / 3, 16 / 9)[int(rng.integers(2))]
    frame_w, frame_h = width + 2 * border, height + 2 * border
    if frame_w / frame_h < aspect:
        frame_w = round(frame_h * aspect)
    else:
        frame_h = round(frame_w * aspect)
    out = Image.new("RGB", (frame_w, frame_h), (0, 0, 0) if rng.random() < 0.5 else (255, 255, 255))
    out.paste(img, ((frame_w - width) // 2, (frame_h - height) // 2))
    return out


def _corrupt_bytes(k: int, rng: np.random.Generator, size: int) -> bytes:
    kind = k % 3
    if kind == 0:
        return b""
    if kind == 1:
        return b"this is not an image\n" * 4
    good = _encode(draw_class(0, rng, size), "jpg")
    return good[: len(good) // 3]


def make_synthetic_pool(out_dir: str | Path, spec: SyntheticSpec = SyntheticSpec(), fmt: str = "folder",
                        shard_size: int = 1000) -> dict:
    """Write the synthetic pool and its ground truth; returns the summary written to synthetic.json."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(spec.seed)
    freqs = class_frequencies(spec.n_classes, spec.imbalance)
    n_sources = spec.n_images - spec.n_corrupt
    # fix the long tail exactly (largest/smallest ratio holds) rather than sampling it
    counts = np.maximum(1, np.round(freqs * n_sources)).astype(int)
    counts[0] += n_sources - counts.sum()
    labels = rng.permutation(np.repeat(np.arange(spec.n_classes), counts))

    n_dup_sources = int(spec.duplicate_fraction * len(labels))
    n_copies = rng.integers(1, 4, n_dup_sources)
    n_originals = len(labels) - int(n_copies.sum())
    originals = labels[:n_originals]
    dup_sources = rng.choice(n_originals, n_dup_sources, replace=False)

    items: list[tuple[bytes, str, int]] = []  # bytes, extension, label
    images: list[Image.Image] = []
    for label in originals:
        img = draw_class(int(label), rng, spec.image_size)
        fmt_i = "png" if rng.random() < 0.2 else "jpg"
        items.append((_encode(img, fmt_i), fmt_i, int(label)))
        images.append(img)
    copies_of: dict[int, list[tuple[int, str]]] = {}
    for source, n in zip(dup_sources, n_copies):
        for kind in rng.choice(DUPLICATE_KINDS, n, replace=False):
            src_bytes, src_ext, label = items[source]
            data = near_duplicate(str(kind), images[source], src_bytes, rng)
            copies_of.setdefault(int(source), []).append((len(items), str(kind)))
            items.append((data, src_ext if kind == "exact" else "jpg", label))
    corrupt_start = len(items)
    for k in range(spec.n_corrupt):
        items.append((_corrupt_bytes(k, rng, spec.image_size), "jpg", -1))

    order = rng.permutation(len(items))  # duplicates and corrupt files scattered through the pool
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    keys = [f"img_{position[i]:06d}" for i in range(len(items))]

    pool_dir = out_dir / "pool"
    with atomic_dir(pool_dir) as tmp:
        if fmt == "folder":
            for i in order:
                data, ext, _ = items[i]
                (tmp / f"{keys[i]}.{ext}").write_bytes(data)
        elif fmt == "shards":
            _write_tar_shards(tmp, [(keys[i], items[i][1], items[i][0]) for i in order], shard_size)
        else:
            raise ValueError(f"unknown pool format {fmt!r}")
    write_json(out_dir / "pool_labels.json", {keys[i]: items[i][2] for i in range(len(items))})
    write_json(out_dir / "duplicates.json", [
        {"source": keys[s], "copies": [{"key": keys[c], "kind": kind} for c, kind in copies]}
        for s, copies in sorted(copies_of.items(), key=lambda kv: keys[kv[0]])
    ])
    write_json(out_dir / "corrupt.json", sorted(keys[i] for i in range(corrupt_start, len(items))))
    for split in ("eval_train", "eval_test"):
        with atomic_dir(out_dir / split) as images, atomic_dir(out_dir / f"{split}_segmentation") as masks, \
                atomic_dir(out_dir / f"{split}_depth") as depths:
            for label, name in enumerate(CLASS_NAMES[: spec.n_classes]):
                for folder in (images, masks, depths):
                    (folder / name).mkdir()
                for j in range(spec.eval_per_class):
                    image, drawn = draw_class_with_object(label, rng, spec.image_size)
                    image.save(images / name / f"{j:04d}.png")
                    Image.fromarray(segmentation_mask(label, drawn)).save(masks / name / f"{j:04d}.png")
                    _save_depth_png(depth_map(drawn), depths / name / f"{j:04d}.png")
    class_counts = np.bincount([lbl for _, _, lbl in items if lbl >= 0], minlength=spec.n_classes).tolist()
    summary = {
        "spec": asdict(spec), "format": fmt, "n_items": len(items), "class_names": CLASS_NAMES[: spec.n_classes],
        "segmentation_classes": SEGMENTATION_CLASSES[: spec.n_classes + 1], "depth_png_scale": DEPTH_PNG_SCALE,
        "class_counts": class_counts, "n_duplicate_groups": len(copies_of),
        "n_duplicate_copies": int(n_copies.sum()), "n_corrupt": spec.n_corrupt,
    }
    write_json(out_dir / "synthetic.json", summary)
    return summary


def _write_tar_shards(out: Path, records: list[tuple[str, str, bytes]], shard_size: int) -> None:
    for shard_id, start in enumerate(range(0, len(records), shard_size)):
        with tarfile.open(out / f"{shard_id:05d}.tar", "w") as tar:
            for key, ext, data in records[start:start + shard_size]:
                _add_bytes(tar, f"{key}.{ext}", data)
                _add_bytes(tar, f"{key}.json", f'{{"key": "{key}"}}'.encode())


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))
