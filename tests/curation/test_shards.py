import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dinoscale.curation.shards import (Selection, n_shards_for, shard_ids_of_slice, shard_name, write_manifest,
                                       write_shard_slice)
from dinoscale.data.pool import open_pool
from dinoscale.errors import DataError

N_IMAGES = 23


@pytest.fixture(scope="module")
def labelled_pool(tmp_path_factory):
    """A folder pool with class sub-folders, mixed png/jpg files, one unreadable file."""
    root = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        cls = ("cat", "dog", "owl")[i % 3]
        (root / cls).mkdir(exist_ok=True)
        h, w = 20 + i % 4, 24
        ramp = np.linspace(0, 1, w)[None, :, None] * rng.integers(0, 256, 3) + rng.integers(0, 100, 3)
        arr = np.broadcast_to(ramp, (h, w, 3)).clip(0, 255).astype(np.uint8).copy()
        arr[4:12, 6:14] = rng.integers(0, 256, 3)  # smooth images with an edge: jpeg keeps them close
        ext = "png" if i % 4 == 0 else "jpg"
        Image.fromarray(arr).save(root / cls / f"im{i:02d}.{ext}", format="PNG" if ext == "png" else "JPEG")
    (root / "cat" / "broken.jpg").write_bytes(b"not an image")
    return open_pool(root)


def make_selection(pool, rng, n=31):
    readable = [i for i, k in enumerate(pool.keys) if not k.endswith("broken")]
    indices = rng.choice(readable, size=n, replace=True)  # repeats allowed, as with allow_repeats
    return Selection(indices=indices.astype(np.int64), cluster_path=rng.integers(0, 5, (n, 2)),
                     source=rng.integers(0, 2, n), source_names=["sampling", "retrieval:seeds"],
                     duplicate_group=rng.integers(-1, 3, n))


def write_all(out, selection, pool, shard_size=8, image_format="png", n_workers=1):
    stats = {}
    for worker in range(n_workers):
        stats.update(write_shard_slice(out, selection, pool, shard_size, image_format, 95, seed=3, worker=worker,
                                       n_workers=n_workers))
    return stats, write_manifest(out, selection, pool, stats, shard_size, image_format, "hash123")


def test_shards_open_as_a_pool_with_the_same_pixels_and_metadata(labelled_pool, tmp_path):
    selection = make_selection(labelled_pool, np.random.default_rng(1))
    _, manifest = write_all(tmp_path / "shards", selection, labelled_pool, image_format="png")

    shards = open_pool(tmp_path / "shards")
    assert len(shards) == len(selection) == manifest["n_items"]
    with tarfile.open(tmp_path / "shards" / shard_name(0)) as tar:
        names = tar.getnames()
    assert sorted(names[:2]) == ["0000000000.json", "0000000000.png"]

    # every shard item is one selection entry; pixels equal the pool's (png is lossless, originals keep bytes)
    metas = []
    for name in sorted(p.name for p in (tmp_path / "shards").glob("*.tar")):
        with tarfile.open(tmp_path / "shards" / name) as tar:
            metas += [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert sorted(m["pool_index"] for m in metas) == sorted(selection.indices.tolist())
    for i, meta in enumerate(metas):
        original = np.asarray(labelled_pool.load(meta["pool_index"]))
        np.testing.assert_array_equal(np.asarray(shards.load(i)), original)
        assert meta["pool_key"] == labelled_pool.keys[meta["pool_index"]]
        assert meta["label"] == meta["pool_key"].split("/")[0]
    # the pool reads the class labels back from the JSON
    assert shards.class_names == ["cat", "dog", "owl"]
    assert [shards.class_names[y] for y in shards.labels] == [m["label"] for m in metas]


def test_metadata_follows_the_selection_and_originals_keep_their_bytes(labelled_pool, tmp_path):
    selection = make_selection(labelled_pool, np.random.default_rng(2))
    _, manifest = write_all(tmp_path / "shards", selection, labelled_pool, image_format="jpg")
    by_position = {}
    for name in sorted(p.name for p in (tmp_path / "shards").glob("*.tar")):
        with tarfile.open(tmp_path / "shards" / name) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for member, data in files.items():
            if member.endswith(".json"):
                key = member[:-5]
                by_position[int(key)] = (json.loads(data), files[f"{key}.jpg"])
    assert sorted(by_position) == list(range(len(selection)))
    originals_jpg = 0
    for meta, image_bytes in by_position.values():
        path = labelled_pool.paths[meta["pool_index"]]
        if path.suffix == ".jpg":
            originals_jpg += 1
            assert image_bytes == path.read_bytes()
        else:  # re-encoded from the png: close to the original pixels
            decoded = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"), dtype=np.int16)
            assert Image.open(io.BytesIO(image_bytes)).format == "JPEG"
            assert np.abs(decoded - np.asarray(labelled_pool.load(meta["pool_index"]), dtype=np.int16)).mean() < 12
    assert manifest["n_reencoded"] == len(selection) - originals_jpg
    # provenance per selection position, via the shuffle: compare as multisets of tuples
    expected = sorted((int(i), tuple(map(int, c)), ["sampling", "retrieval:seeds"][s], int(g)) for i, c, s, g in zip(
        selection.indices, selection.cluster_path, selection.source, selection.duplicate_group))
    found = sorted((m["pool_index"], tuple(m["cluster_path"]), m["source"], m["duplicate_group"])
                   for m, _ in by_position.values())
    assert found == expected


def test_manifest_counts_and_histograms(labelled_pool, tmp_path):
    selection = make_selection(labelled_pool, np.random.default_rng(3))
    _, manifest = write_all(tmp_path / "shards", selection, labelled_pool, shard_size=8)
    assert manifest == json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert [s["n_items"] for s in manifest["shards"]] == [8, 8, 8, 7]
    assert manifest["config_hash"] == "hash123"
    top = selection.cluster_path[:, -1]
    assert manifest["top_level_cluster_histogram"] == {str(c): int((top == c).sum()) for c in np.unique(top)}
    labels = [labelled_pool.keys[i].split("/")[0] for i in selection.indices]
    assert manifest["class_histogram"] == {c: labels.count(c) for c in sorted(set(labels))}
    assert manifest["sources"]["sampling"] == int((selection.source == 0).sum())
    assert manifest["n_unique_images"] == len(set(selection.indices.tolist()))


def test_sliced_writing_gives_the_same_bytes(labelled_pool, tmp_path):
    selection = make_selection(labelled_pool, np.random.default_rng(4))
    write_all(tmp_path / "one", selection, labelled_pool, shard_size=5, n_workers=1)
    write_all(tmp_path / "three", selection, labelled_pool, shard_size=5, n_workers=3)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "three").iterdir())
    assert len([n for n in names if n.endswith(".tar")]) == n_shards_for(len(selection), 5) == 7
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes(), name


def test_slices_of_shard_ids_tile_the_shards():
    for n_shards in (1, 7, 30):
        for n_workers in (1, 2, 7, 9):
            ids = [s for w in range(n_workers) for s in shard_ids_of_slice(n_shards, w, n_workers)]
            assert ids == list(range(n_shards))
    with pytest.raises(DataError):
        shard_ids_of_slice(4, 2, 2)


def test_webdataset_reads_the_shards(labelled_pool, tmp_path):
    selection = make_selection(labelled_pool, np.random.default_rng(5))
    write_all(tmp_path / "shards", selection, labelled_pool, shard_size=10)
    urls = [str(p) for p in sorted((tmp_path / "shards").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("png", "json"))
    assert len(samples) == len(selection)
    image, meta = samples[0]
    np.testing.assert_array_equal(image, np.asarray(labelled_pool.load(meta["pool_index"])))


def test_manifest_removes_stale_shards_and_reports_missing_ones(labelled_pool, tmp_path):
    selection = make_selection(labelled_pool, np.random.default_rng(6))
    out = tmp_path / "shards"
    stats, _ = write_all(out, selection, labelled_pool, shard_size=10)
    (out / shard_name(9)).write_bytes(b"left from an earlier, larger selection")
    write_manifest(out, selection, labelled_pool, stats, 10, "png", "h")
    assert not (out / shard_name(9)).exists()
    (out / shard_name(1)).unlink()
    with pytest.raises(DataError, match="not written"):
        write_manifest(out, selection, labelled_pool, stats, 10, "png", "h")


def test_unreadable_images_are_skipped_and_counted(labelled_pool, tmp_path):
    broken = labelled_pool.keys.index("cat/broken")
    selection = Selection(np.array([broken, broken + 1, broken + 2]), np.zeros((3, 1), dtype=np.int64), np.zeros(3, dtype=np.int64),
                          ["sampling"], np.full(3, -1))
    _, manifest = write_all(tmp_path / "shards", selection, labelled_pool, shard_size=10)
    assert manifest["n_unreadable"] == 1 and manifest["n_items"] == 2
    assert len(open_pool(tmp_path / "shards")) == 2
