import hashlib
import json

import numpy as np
from PIL import Image

from dinoscale.data.pool import open_pool
from dinoscale.data.synthetic import SyntheticSpec, make_synthetic_pool

SPEC = SyntheticSpec(n_images=300, image_size=32, eval_per_class=2, n_corrupt=3, seed=5)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_pool(tmp_path):
    make_synthetic_pool(tmp_path / "a", SPEC)
    make_synthetic_pool(tmp_path / "b", SPEC)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    make_synthetic_pool(tmp_path / "c", SyntheticSpec(**{**SPEC.__dict__, "seed": 6}))
    assert _digest(tmp_path / "a" / "pool") != _digest(tmp_path / "c" / "pool")


def test_ground_truth_matches_what_was_written(tmp_path):
    summary = make_synthetic_pool(tmp_path, SPEC)
    pool = open_pool(tmp_path / "pool")
    labels = json.loads((tmp_path / "pool_labels.json").read_text())
    groups = json.loads((tmp_path / "duplicates.json").read_text())
    corrupt = json.loads((tmp_path / "corrupt.json").read_text())
    assert sorted(labels) == pool.keys and len(pool) == SPEC.n_images
    index = {k: i for i, k in enumerate(pool.keys)}

    scan = pool.scan()
    assert scan.readable == SPEC.n_images - SPEC.n_corrupt
    assert {pool.keys[i] for i in range(len(pool)) if pool.load(i) is None} == set(corrupt)

    counts = np.bincount([v for v in labels.values() if v >= 0], minlength=SPEC.n_classes)
    assert counts.tolist() == summary["class_counts"]
    assert counts.max() >= 30 * counts.min()  # long tail

    assert len(groups) > 5

    def thumb(key):
        return np.asarray(pool.load(index[key]).resize((8, 8), Image.BOX), dtype=np.float64).ravel()

    readable = [k for k in pool.keys if k not in corrupt]
    thumbs = np.stack([thumb(k) for k in readable])
    for group in groups:
        members = {group["source"]} | {c["key"] for c in group["copies"]}
        others = thumbs[[k not in members for k in readable]]
        source = thumb(group["source"])
        for copy in group["copies"]:
            assert labels[copy["key"]] == labels[group["source"]]
            if copy["kind"] == "exact":
                assert pool.read_bytes(index[copy["key"]]) == pool.read_bytes(index[group["source"]])
            # a near duplicate is closer to its source than any image outside its group
            distance = np.abs(thumb(copy["key"]) - source).mean()
            assert distance < np.abs(others - source).mean(axis=1).min()


def test_eval_splits_are_balanced_and_labelled(tmp_path):
    make_synthetic_pool(tmp_path, SPEC)
    for split in ("eval_train", "eval_test"):
        pool = open_pool(tmp_path / split)
        assert len(pool.class_names) == SPEC.n_classes
        assert np.bincount(pool.labels).tolist() == [SPEC.eval_per_class] * SPEC.n_classes


def test_shard_format_holds_the_same_images(tmp_path):
    make_synthetic_pool(tmp_path / "f", SPEC)
    make_synthetic_pool(tmp_path / "s", SPEC, fmt="shards", shard_size=100)
    folder, shards = open_pool(tmp_path / "f" / "pool"), open_pool(tmp_path / "s" / "pool")
    assert folder.keys == shards.keys
    assert all(folder.read_bytes(i) == shards.read_bytes(i) for i in range(0, len(folder), 17))
