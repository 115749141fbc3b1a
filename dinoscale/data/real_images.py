"""A real-image evaluation set for near-duplicate detection, with ground truth by construction.

Sources are pictures that Debian packages and scikit-image install (nothing is downloaded):

- oxygen icons, /usr/share/icons/oxygen/base/<size>/<context>/<name>.png (sizes 8-256): the
  context folder (actions, apps, mimetypes, ...) is the image's category;
- GNOME wallpapers, /usr/share/backgrounds/ (the raster files; SVGs and XML slide shows are skipped);
- the sample photos scikit-image ships beside `skimage.data` (when it is installed).

Which source files show the same picture, and so are duplicates of each other:

- symlinks are aliases: only the file they resolve to is used, once;
- byte-identical files are one source (their sha256 is hashed once; the first path in sorted order stays);
- an icon name within a context is one picture at every size: the same icon at 16 and 256 px is a
  real resize copy that the collection holds, and is scored as a duplicate;
- the same icon name in two contexts is two pictures (most are drawn differently: `media-playlist-
  shuffle` in actions and status differs by a mean 138/255 per channel) unless the next rule joins them;
- two sources that, composited on white and shrunk (or enlarged) to COMPARE_SIDE px square, differ by
  an RMS of at most SAME_PICTURE_RMS (0-255 scale) are the same picture under another name (`kfind`
  and `system-search`: 0.0; `bookmarks` at 128 px and `favorites` at 256 px: 0.5; the same ball as
  `applications-toys` and `applications-education-preschool`: 1.2); a picture joined so is joined
  at all its sizes.

Two pictures with sources that differ by an RMS above that but at most LOOKALIKE_RMS are
"look-alike originals": a blank page and the same page with a faint question mark, two battery
levels, a page with slightly different faint text. They are reported, and their pairs are left
out of precision and recall (neither planted copies nor clearly different pictures): a copy
detector that tolerates a JPEG re-encode cannot tell them apart, since the re-encode changes more
pixels than they differ by. Every other pair of different pictures is a true non-duplicate.

Planted copies: a seeded random share of the sources of side >= MIN_COPY_SIDE get 1-3 copies, each
made by one edit of `synthetic.near_duplicate` (exact copy, JPEG re-encode, resize, crop, brightness
as in the synthetic pool, and caption, overlay, padding/letterbox, optionally horizontal flip) from the
source shrunk to at most COPY_MAX_SIDE px (copies of large pictures are usually smaller). A copy is
the same picture as its source.

The pool is written flat as `pool/img_NNNNNN.ext` in a seeded random order with `real_set.json` beside
it: per key its picture id, category, origin (`source` or the edit) and source key, plus the look-alike
picture pairs and counts.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from dinoscale.data.pool import IMAGE_EXTENSIONS, decode_image
from dinoscale.data.synthetic import DUPLICATE_KINDS, near_duplicate
from dinoscale.errors import DataError
from dinoscale.utils.io import atomic_dir, read_json, write_json

OXYGEN_ROOT = Path("/usr/share/icons/oxygen/base")
WALLPAPER_ROOT = Path("/usr/share/backgrounds")
COMPARE_SIDE = 32
COMPARE_CHUNK = 2048
SAME_PICTURE_RMS = 2.0
LOOKALIKE_RMS = 5.0
MIN_COPY_SIDE = 32
COPY_MAX_SIDE = 1024
REAL_EDITS = (*DUPLICATE_KINDS, "caption", "overlay", "pad")
SET_FILE = "real_set.json"


@dataclass(frozen=True)
class Source:
    """One source file: its path, the picture it shows and the category it belongs to."""

    path: Path
    picture: str  # e.g. "oxygen/actions/document-new": the same id at every size
    category: str  # the icon context, "wallpaper" or "photo"


@dataclass(frozen=True)
class RealSetSpec:
    copy_fraction: float = 0.25  # share of the sources of side >= MIN_COPY_SIDE that get copies
    max_copies: int = 3
    edits: tuple[str, ...] = REAL_EDITS  # add "flip" to plant mirrored copies too
    icon_sizes: tuple[int, ...] = (8, 16, 22, 32, 48, 64, 128, 256)
    icon_contexts: tuple[str, ...] = ()  # empty: every context
    max_pictures: int | None = None  # keep only this many pictures (a seeded subset, all their sizes)
    wallpapers: bool = True
    scikit_image: bool = True
    seed: int = 0


def oxygen_icons(root: Path = OXYGEN_ROOT, sizes: Iterable[int] = RealSetSpec.icon_sizes,
                 contexts: Sequence[str] = ()) -> list[Source]:
    """The icon files (no symlinks) of the given sizes and contexts, sorted by path."""
    sources = []
    for size in sizes:
        for path in sorted((root / f"{size}x{size}").glob("*/*.png")):
            context = path.parent.name
            if path.is_symlink() or (contexts and context not in contexts):
                continue
            sources.append(Source(path, f"oxygen/{context}/{path.stem}", context))
    return sources


def gnome_wallpapers(root: Path = WALLPAPER_ROOT) -> list[Source]:
    """Raster wallpapers (SVG and XML slide-show files are not images a pool reads)."""
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_symlink())
    return [Source(p, f"wallpaper/{p.relative_to(root).with_suffix('')}", "wallpaper") for p in paths]


def scikit_image_samples() -> list[Source]:
    """The sample photos in scikit-image's data folder, or none when it is not installed."""
    try:
        import skimage.data
    except ImportError:
        return []
    root = Path(skimage.data.__file__).parent
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.suffix != ".tif")
    return [Source(p, f"skimage/{p.stem}", "photo") for p in paths]


def collect_sources(spec: RealSetSpec) -> list[Source]:
    sources = oxygen_icons(sizes=spec.icon_sizes, contexts=spec.icon_contexts) if OXYGEN_ROOT.is_dir() else []
    if spec.wallpapers and WALLPAPER_ROOT.is_dir():
        sources += gnome_wallpapers()
    if spec.scikit_image:
        sources += scikit_image_samples()
    if spec.max_pictures is not None:
        pictures = sorted({s.picture for s in sources})
        rng = np.random.default_rng((spec.seed, 7))
        chosen = set(rng.choice(pictures, min(spec.max_pictures, len(pictures)), replace=False).tolist())
        sources = [s for s in sources if s.picture in chosen]
    return sources


class _Pictures:
    """Union-find over picture ids: which ids name one picture."""

    def __init__(self, ids: Iterable[str]):
        self.parent = {i: i for i in ids}

    def find(self, i: str) -> str:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the smallest id names the picture


@dataclass
class _Loaded:
    source: Source
    data: bytes
    image: Image.Image


def _load_distinct(sources: Sequence[Source], pictures: _Pictures) -> list[_Loaded]:
    """Read every source once; byte-identical files become one source whose pictures are joined."""
    first_of: dict[str, _Loaded] = {}
    loaded = []
    for source in sources:
        data = source.path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest in first_of:
            pictures.union(first_of[digest].source.picture, source.picture)
            continue
        decoded = decode_image(data)
        if decoded.image is None:
            continue
        first_of[digest] = _Loaded(source, data, decoded.image)
        loaded.append(first_of[digest])
    return loaded


def _compare_pixels(loaded: Sequence[_Loaded], pictures: _Pictures) -> set[tuple[str, str]]:
    """Join pictures with sources that look the same at COMPARE_SIDE px (RMS <= SAME_PICTURE_RMS); return
    the pairs of pictures (by their original ids) with sources within LOOKALIKE_RMS of each other."""
    x = np.stack([np.asarray(item.image.resize((COMPARE_SIDE, COMPARE_SIDE), Image.BOX if min(item.image.size)
                                               >= COMPARE_SIDE else Image.BICUBIC), dtype=np.float32).ravel()
                  for item in loaded])
    squared = (x**2).sum(1)
    lookalikes = set()
    for start in range(0, len(x), COMPARE_CHUNK):
        block = slice(start, start + COMPARE_CHUNK)
        rms = np.sqrt(np.maximum(squared[block, None] + squared[None] - 2 * x[block] @ x.T, 0) / x.shape[1])
        for a, b in zip(*np.nonzero(rms <= LOOKALIKE_RMS)):
            pa, pb = loaded[start + a].source.picture, loaded[b].source.picture
            if pa >= pb:
                continue
            if rms[a, b] <= SAME_PICTURE_RMS:
                pictures.union(pa, pb)
            else:
                lookalikes.add((pa, pb))
    return lookalikes


def build_real_set(out_dir: str | Path, spec: RealSetSpec = RealSetSpec()) -> dict:
    """Write the pool and its ground truth under `out_dir`; returns what `real_set.json` holds."""
    sources = collect_sources(spec)
    if not sources:
        raise DataError("no real images found: install the oxygen-icon-theme and gnome-backgrounds packages "
                        "(.ci/install_datasets.sh) or scikit-image")
    pictures = _Pictures(s.picture for s in sources)
    loaded = _load_distinct(sources, pictures)
    lookalike_ids = _compare_pixels(loaded, pictures)
    lookalikes = sorted({tuple(sorted((pictures.find(a), pictures.find(b)))) for a, b in lookalike_ids
                         if pictures.find(a) != pictures.find(b)})

    rng = np.random.default_rng(spec.seed)
    items: list[dict] = []  # bytes, extension, picture, category, origin, source item
    for item in loaded:
        items.append({"data": item.data, "ext": item.source.path.suffix.lower().lstrip("."),
                      "picture": pictures.find(item.source.picture), "category": item.source.category,
                      "origin": "source", "source": len(items), "path": str(item.source.path)})
    copyable = [i for i, item in enumerate(loaded) if min(item.image.size) >= MIN_COPY_SIDE]
    chosen = rng.choice(copyable, int(round(spec.copy_fraction * len(copyable))), replace=False)
    for i in sorted(chosen.tolist()):
        image = loaded[i].image
        if max(image.size) > COPY_MAX_SIDE:
            image = image.copy()
            image.thumbnail((COPY_MAX_SIDE, COPY_MAX_SIDE), Image.BICUBIC)
        n_copies = int(rng.integers(1, spec.max_copies + 1))
        for edit in rng.choice(spec.edits, min(n_copies, len(spec.edits)), replace=False):
            data = near_duplicate(str(edit), image, loaded[i].data, rng)
            items.append({**items[i], "data": data, "ext": items[i]["ext"] if edit == "exact" else "jpg",
                          "origin": str(edit), "source": i, "path": ""})

    order = rng.permutation(len(items))
    keys = [""] * len(items)
    for position, i in enumerate(order):
        keys[i] = f"img_{position:06d}"
    with atomic_dir(Path(out_dir) / "pool") as tmp:
        for i in order:
            (tmp / f"{keys[i]}.{items[i]['ext']}").write_bytes(items[i]["data"])
    origins = [item["origin"] for item in items]
    summary = {
        "spec": asdict(spec),
        "items": {keys[i]: {"picture": item["picture"], "category": item["category"], "origin": item["origin"],
                            "source": keys[item["source"]], "path": _package_path(item["path"])}
                  for i, item in enumerate(items)},
        "lookalike_pictures": [list(pair) for pair in lookalikes],
        "counts": {"items": len(items), "sources": len(loaded), "source_files": len(sources),
                   "pictures": len({item["picture"] for item in items}),
                   "byte_identical_files": len(sources) - len(loaded), "lookalike_picture_pairs": len(lookalikes),
                   "copies": {edit: origins.count(edit) for edit in spec.edits}},
    }
    write_json(Path(out_dir) / SET_FILE, summary)
    return summary


def _package_path(path: str) -> str:
    """Where a source file lies, without the folder of the Python environment it came from."""
    if "site-packages" in path:
        return "skimage/data/" + os.path.basename(path)
    return path


def load_real_set(directory: str | Path) -> dict:
    path = Path(directory) / SET_FILE
    if not path.is_file():
        raise DataError(f"no real-image set in {directory} ({SET_FILE} missing); build it with build_real_set")
    return read_json(path)

