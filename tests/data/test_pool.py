import io
import json
import logging
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from dinoscale.data.pool import FolderPool, PathListPool, StringArray, TarShardPool, open_pool
from dinoscale.errors import DataError


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def labelled_images(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    files = {}
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for j in range(3):
            arr = rng.integers(0, 256, (12 + j, 16, 3), dtype=np.uint8)
            data = _png(Image.fromarray(arr))
            (root / cls / f"im{j}.png").write_bytes(data)
            files[f"{cls}/im{j}"] = (data, arr)
    return root, files


def _write_shards(path, records, per_shard):
    path.mkdir()
    for s, start in enumerate(range(0, len(records), per_shard)):
        with tarfile.open(path / f"{s:05d}.tar", "w") as tar:
            for key, data, label in records[start:start + per_shard]:
                for name, blob in ((f"{key}.png", data), (f"{key}.cls", label.encode()),
                                   (f"{key}.json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))


def test_three_layouts_give_same_keys_labels_and_pixels(labelled_images, tmp_path):
    root, files = labelled_images
    (root / "list.txt").write_text("\n".join(f"{k}.png" for k in sorted(files)) + "\n")
    _write_shards(tmp_path / "shards", [(k, files[k][0], k.split("/")[0]) for k in sorted(files)], per_shard=4)

    pools = [open_pool(root), open_pool(root / "list.txt"), open_pool(tmp_path / "shards")]
    assert [type(p) for p in pools] == [FolderPool, PathListPool, TarShardPool]
    for pool in pools:
        assert pool.keys == sorted(files)
        assert isinstance(pool.keys, StringArray)  # no Python object per item (see StringArray)
        assert pool.class_names == ["cat", "dog"]
        assert pool.labels == [0, 0, 0, 1, 1, 1]
        for i, key in enumerate(pool.keys):
            np.testing.assert_array_equal(np.asarray(pool.load(i)), files[key][1])
        assert pool.summary().readable == 6


def _jpeg(img, **kwargs):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def test_broken_files_are_skipped_and_counted(tmp_path):
    root = tmp_path / "broken"
    root.mkdir()
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    (root / "a_ok.png").write_bytes(_png(rgb))
    good_jpeg = _jpeg(rgb)
    (root / "b_truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (root / "c_zero.jpg").write_bytes(b"")
    (root / "d_text.jpg").write_text("hello, I am not a JPEG\n")
    Image.new("1", (20000, 20000)).save(root / "e_huge.png")
    (root / "f_cmyk.jpg").write_bytes(_jpeg(Image.new("CMYK", (20, 20), (0, 255, 255, 0))))  # red in CMYK
    Image.fromarray(np.full((20, 20), 65535 // 2, dtype=np.uint16)).save(root / "g_16bit.png")
    # EXIF orientation 6: the viewer rotates the stored pixels 90 degrees clockwise
    stored = Image.new("RGB", (40, 20), (0, 0, 0))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "h_exif.jpg").write_bytes(_jpeg(stored, exif=exif.tobytes(), quality=95))
    Image.new("L", (20, 20), 77).save(root / "i_grey.png")
    Image.new("P", (20, 20), 3).save(root / "j_palette.png")

    pool = open_pool(root)
    images = {pool.keys[i]: pool.load(i) for i in range(len(pool))}
    readable = {k for k, v in images.items() if v is not None}
    assert readable == {"a_ok", "f_cmyk", "g_16bit", "h_exif", "i_grey", "j_palette"}
    assert all(images[k].mode == "RGB" for k in readable)
    assert dict(pool.skipped) == {"truncated_or_corrupt": 1, "empty": 1, "not_an_image": 1, "too_large": 1}

    upright = np.asarray(images["h_exif"])
    assert upright.shape == (40, 20, 3)  # rotated to portrait
    assert upright[5, 10, 0] > 200 and upright[35, 10, 0] < 50  # red half now on top
    assert np.asarray(images["f_cmyk"])[10, 10].tolist()[0] > 200
    assert abs(int(np.asarray(images["g_16bit"])[0, 0, 0]) - 128) <= 1  # scaled, not clipped to 255
    assert np.asarray(images["i_grey"])[0, 0].tolist() == [77, 77, 77]


def test_a_skipped_image_is_logged_once_and_counted_every_time(tmp_path, caplog):
    root = tmp_path / "pool"
    root.mkdir()
    (root / "bad.jpg").write_bytes(b"")
    pool = open_pool(root)
    with caplog.at_level(logging.INFO, logger="dinoscale"):
        for _ in range(3):  # three epochs
            assert pool.load(0) is None
    assert sum("skipping bad" in record.getMessage() for record in caplog.records) == 1
    assert pool.skipped["empty"] == 3


@pytest.mark.parametrize("n_items", [1, 7, 100])
@pytest.mark.parametrize("n_workers", [1, 2, 3, 8])
def test_slices_cover_every_item_once(tmp_path, n_items, n_workers):
    root = tmp_path / "p"
    root.mkdir()
    for i in range(n_items):
        (root / f"{i:04d}.png").write_bytes(b"x")
    pool = open_pool(root)
    covered = [i for w in range(n_workers) for i in pool.slice(w, n_workers)]
    assert covered == list(range(n_items))


def test_missing_pool_and_bad_slice_raise_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_pool(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        open_pool(tmp_path / "empty")
    (tmp_path / "empty" / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="slice 3/3 is invalid"):
        open_pool(tmp_path / "empty").slice(3, 3)


def test_string_array_reads_like_the_list_it_holds():
    items = ["cat/im0", "", "dög/ímage 1", "x" * 300, "日本/写真"]
    keys = StringArray(items)
    assert len(keys) == 5 and list(keys) == items and keys == items and items == keys
    assert [keys[i] for i in range(-5, 5)] == items + items
    assert keys[1:4] == items[1:4] and keys[::-2] == items[::-2]
    assert keys.index("dög/ímage 1") == 2 and "日本/写真" in keys and "cat" not in keys
    assert keys[np.int64(4)] == "日本/写真" and isinstance(keys[0], str)
    assert keys != items[:4] and keys != ["cat/im0", "", "dog", "x" * 300, "日本/写真"]
    assert pickle.loads(pickle.dumps(keys)) == keys
    with pytest.raises(IndexError):
        keys[5]
    assert list(StringArray([])) == [] and len(StringArray([])) == 0
