import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from dinoscale.config import load_config
from dinoscale.curation import embed
from dinoscale.curation.copy_descriptor import CopyDescriptorEmbedder
from dinoscale.curation.store import RowStore
from dinoscale.data.pool import open_pool
from dinoscale.errors import ConfigError, DataError
from dinoscale.eval.features import eval_transform
from dinoscale.models import save_backbone

@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    """19 small images of varied sizes and two unreadable files."""
    root = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    for i in range(19):
        arr = rng.integers(0, 256, (20 + i, 28 + 2 * (i % 3), 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"im{i:02d}.png")
    (root / "im05x.jpg").write_bytes(b"")
    (root / "im11x.jpg").write_bytes(b"garbage, not a jpeg")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_backbone):
    model = tiny_backbone(patch_size=8, img_size=32)
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    save_backbone(model, path)
    return path, model.eval()


def embed_cfg(**changes):
    return load_config(None, [f"curation.embed.{k}={v}" for k, v in changes.items()]).curation.embed


def test_slice_ranges_are_whole_batches_that_tile_the_pool():
    for n_items in (1, 63, 64, 65, 1000):
        for n_workers in (1, 2, 3, 7, 40):
            ranges = [embed.embed_slice_range(n_items, 16, w, n_workers) for w in range(n_workers)]
            assert [i for r in ranges for i in r] == list(range(n_items))
            assert all(r.start % 16 == 0 for r in ranges if len(r))
    with pytest.raises(ConfigError):
        embed.embed_slice_range(10, 4, 3, 3)


def test_pixel_embedding_hashes_and_unreadable_rows(pool_dir):
    pool = open_pool(pool_dir)
    result = embed.embed_slice(pool, range(len(pool)), {embed.MAIN: embed.PixelEmbedder(8)}, "", 4, 0)
    x, valid = result.arrays[embed.MAIN], result.arrays["valid"]
    assert x.dtype == np.float16 and x.shape == (21, 3 * 8 * 8)
    readable = np.array([not k.endswith("x") for k in pool.keys])
    np.testing.assert_array_equal(valid, readable)
    assert result.skipped == {"empty": 1, "not_an_image": 1}
    assert not x[~readable].any()
    transform = eval_transform(8)
    for i in np.flatnonzero(readable):
        expected = F.normalize(transform(pool.load(i)).flatten(), dim=0).numpy()
        np.testing.assert_allclose(x[i].astype(np.float32), expected, atol=2e-3)
        image = Image.open(pool.paths[i])
        assert result.arrays["pixel_counts"][i] == image.width * image.height
    assert [h.decode() for h in result.arrays["content_hashes"]] == [
        hashlib.sha256(p.read_bytes()).hexdigest() for p in pool.paths]


def test_backbone_embedding_from_weights_file_and_run_directory(pool_dir, weights, tmp_path):
    path, model = weights
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "teacher.pth").write_bytes(path.read_bytes())
    pool = open_pool(pool_dir)
    outputs = []
    for backbone in (str(path), str(run)):
        cfg = embed_cfg(backbone=backbone, image_size=32, precision="fp32", features="cls_patchmean")
        embedders = embed.pool_embedders(cfg)
        outputs.append(embed.embed_slice(pool, range(len(pool)), embedders, "", 8, 0).arrays[embed.MAIN])
    np.testing.assert_array_equal(outputs[0], outputs[1])
    x = outputs[0].astype(np.float32)
    valid = np.array([not k.endswith("x") for k in pool.keys])
    assert x.shape == (21, 64)
    np.testing.assert_allclose(np.linalg.norm(x[valid], axis=1), 1.0, atol=2e-3)
    # independently: normalised CLS and mean patch token side by side, over sqrt(2)
    images = torch.stack([eval_transform(32)(pool.load(i)) for i in np.flatnonzero(valid)])
    with torch.no_grad():
        out = model.forward_features(images)
    cls = F.normalize(out["x_norm_clstoken"], dim=1)
    patch = F.normalize(out["x_norm_patchtokens"].mean(1), dim=1)
    np.testing.assert_allclose(x[valid], (torch.cat([cls, patch], 1) / 2 ** 0.5).numpy(), atol=2e-3)


def test_slices_reproduce_the_single_process_embedding_in_bf16(pool_dir, weights, tmp_path):
    path, _ = weights
    pool = open_pool(pool_dir)
    cfg = embed_cfg(backbone=str(path), image_size=32, precision="bf16", copy_detection="descriptor")
    embedders = embed.pool_embedders(cfg)
    whole = embed.embed_slice(pool, range(len(pool)), embedders, "", 4, 0)
    embed.save_slice(tmp_path / "whole", whole)
    slice_dirs = []
    for worker in range(3):
        rows = embed.embed_slice_range(len(pool), 4, worker, 3)
        part = embed.embed_slice(pool, rows, embedders, "", 4, num_workers=1)  # decoding in a worker process
        slice_dirs.append(tmp_path / "merged" / f"slice{worker}")
        embed.save_slice(slice_dirs[-1], part)
    counts = embed.list_slices(slice_dirs, tmp_path / "merged")
    assert counts["items"] == 21 and counts["valid"] == 19
    assert counts[f"{embed.MAIN}_dim"] == 32 and counts[f"{embed.COPY}_dim"] == CopyDescriptorEmbedder(32).dim
    for name in (embed.MAIN, embed.COPY, "valid", "content_hashes", "pixel_counts"):
        merged = np.asarray(RowStore.open(tmp_path / "merged", name))
        single = np.load(tmp_path / "whole" / f"{name}.npy")
        assert merged.dtype == single.dtype and merged.shape == single.shape and merged.tobytes() == single.tobytes()


def test_bf16_stays_close_to_fp32(pool_dir, weights):
    path, _ = weights
    pool = open_pool(pool_dir)
    rows = {}
    for precision in ("fp32", "bf16"):
        embedders = embed.pool_embedders(embed_cfg(backbone=str(path), image_size=32, precision=precision))
        rows[precision] = embed.embed_slice(pool, range(len(pool)), embedders, "", 8, 0).arrays[embed.MAIN]
    valid = np.array([not k.endswith("x") for k in pool.keys])
    cosine = (rows["fp32"].astype(np.float32) * rows["bf16"].astype(np.float32)).sum(1)[valid]
    assert cosine.min() > 0.99


def test_rows_from_an_embeddings_file(pool_dir, tmp_path):
    pool = open_pool(pool_dir)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(pool), 6)) * 5
    x[3] = 0
    x[7, 2] = np.nan
    np.save(tmp_path / "emb.npy", x)
    result = embed.embed_slice(pool, range(2, 15), {}, str(tmp_path / "emb.npy"), 8, 0)
    rows, valid = result.arrays[embed.MAIN].astype(np.float32), result.arrays["valid"]
    readable = np.array([not k.endswith("x") for k in pool.keys])[2:15]
    expected_valid = readable & ~np.isin(np.arange(2, 15), [3, 7])
    np.testing.assert_array_equal(valid, expected_valid)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = x[2:15] / np.linalg.norm(x[2:15], axis=1, keepdims=True)
    np.testing.assert_allclose(rows[valid], expected[valid], atol=2e-3)
    assert not rows[~valid].any()
    # without a pool: no hashes, every finite non-zero row is valid
    alone = embed.embed_slice(None, range(len(pool)), {}, str(tmp_path / "emb.npy"), 8, 0)
    assert alone.arrays["valid"].sum() == len(pool) - 2

    np.save(tmp_path / "short.npy", x[:5])
    with pytest.raises(DataError, match="rows"):
        embed.embed_slice(pool, range(0, 4), {}, str(tmp_path / "short.npy"), 8, 0)
    with pytest.raises(ConfigError, match="does not exist"):
        embed.load_embeddings_file(tmp_path / "nope.npy", None)


def test_backbone_path_mistakes_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="empty"):
        embed.backbone_weights("")
    with pytest.raises(ConfigError, match="export/teacher.pth"):
        embed.backbone_weights(str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        embed.backbone_weights(str(tmp_path / "missing.pth"))


def test_image_size_must_fit_the_patch_grid(weights):
    path, _ = weights
    with pytest.raises(ConfigError, match="multiple of the backbone's patch size 8"):
        embed.build_embedder(str(path), 30, embed_cfg())


def test_reference_sets_from_npy_or_pool(pool_dir, tmp_path):
    np.save(tmp_path / "ref.npy", np.ones((3, 4), dtype=np.float32))
    assert embed.embed_reference_set(tmp_path / "ref.npy", "", 8, embed_cfg()).shape == (3, 4)
    cfg = OmegaConf.merge(embed_cfg(), {"num_workers": 0})
    rows = embed.embed_reference_set(pool_dir, "pixels", 8, cfg)
    assert rows.shape == (19, 192)
    with pytest.raises(ConfigError, match="no image embedder"):
        embed.embed_reference_set(pool_dir, "", 8, cfg)
