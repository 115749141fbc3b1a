"""Labelled evaluation data besides class sub-folders: a CSV file with labels, a path list of images
in class folders, and a subset of the val images scored on its own."""

import json

import numpy as np
import pytest

from dinoscale.config import load_config
from dinoscale.data.pool import open_pool
from dinoscale.errors import DataError
from dinoscale.eval.cli import main
from dinoscale.eval.evaluate import evaluate_knn, open_labelled, read_key_subset
from dinoscale.models.loading import load_backbone


FAST = ["eval.image_size=16", "eval.batch_size=8", "eval.num_workers=0", "eval.precision=fp32", "eval.knn_k=[1,3]"]


def _csv(path, rows, header="path,label"):
    path.write_text("\n".join([header, *(",".join(row) for row in rows)]) + "\n")
    return path


def _knn(weights, train, val):
    return evaluate_knn(load_backbone(weights), open_labelled(train, "train"), open_labelled(val, "val"),
                        load_config(None, FAST).eval)


def test_a_csv_file_gives_paths_and_labels(workspace, tmp_path):
    # the labels come from the CSV, not from the folders: name the classes differently and list absolute paths
    names = {"blue": "sky", "green": "grass", "red": "fire"}
    for split in ("train", "val"):
        rows = [(str(p), names[p.parent.name]) for p in sorted((workspace / split).rglob("*.png"))]
        _csv(tmp_path / f"{split}.csv", rows)
    pool = open_pool(tmp_path / "train.csv")
    assert pool.class_names == ["fire", "grass", "sky"]
    assert [pool.class_names[label] for label in pool.labels] == [names[p.parent.name] for p in
                                                                  sorted((workspace / "train").rglob("*.png"))]
    from_csv = _knn(workspace / "backbone.pth", tmp_path / "train.csv", tmp_path / "val.csv")
    from_folders = _knn(workspace / "backbone.pth", workspace / "train", workspace / "val")
    assert from_csv.top1 == from_folders.top1 and from_csv.n_queries == 12


def test_a_path_list_takes_each_image_folder_as_its_class(workspace, tmp_path):
    paths = sorted((workspace / "val").rglob("*.png"))
    (tmp_path / "val.txt").write_text("\n".join(str(p) for p in paths) + "\n")  # absolute paths
    pool = open_pool(tmp_path / "val.txt")
    assert pool.class_names == ["blue", "green", "red"]
    assert [pool.class_names[label] for label in pool.labels] == [p.parent.name for p in paths]
    (tmp_path / "flat.txt").write_text("\n".join(str(p) for p in paths if p.parent.name == "red") + "\n")
    assert open_pool(tmp_path / "flat.txt").labels is None  # one folder: no classes to tell apart


def test_bad_csv_files_and_one_class_banks_are_explained(workspace, tmp_path):
    with pytest.raises(DataError, match="must name the columns, one of them `path`"):
        open_pool(_csv(tmp_path / "no_header.csv", [("a.png", "x")], header="file,class"))
    with pytest.raises(DataError, match=r"one_empty.csv:3 has an empty label"):
        open_pool(_csv(tmp_path / "one_empty.csv", [("a.png", "x"), ("b.png", "")]))
    one_class = _csv(tmp_path / "one_class.csv", [(str(p), "same") for p in (workspace / "train").rglob("*.png")])
    with pytest.raises(DataError, match="has a single class"):
        open_labelled(one_class, "train")


def test_knn_scores_a_val_subset_and_its_complement_on_their_own(workspace, tmp_path):
    val = open_pool(workspace / "val")
    chosen = [key for key in val.keys if key.endswith(("000", "001"))]  # 2 of the 4 images of each class
    (tmp_path / "keys.txt").write_text("\n".join(f"{key}.png" for key in chosen) + "\n")
    mask = np.array([key in chosen for key in val.keys])
    np.save(tmp_path / "copies.npy", ~mask)  # e.g. the val images that have a copy in train
    assert read_key_subset(tmp_path / "keys.txt", val) == read_key_subset(tmp_path / "copies.npy", val) ^ set(val.keys)

    assert main(["knn", "--weights", str(workspace / "backbone.pth"), "--train", str(workspace / "train"), "--val",
                 str(workspace / "val"), "--out", str(tmp_path / "out"), "--val-subset", str(tmp_path / "keys.txt"),
                 "--val-exclude", str(tmp_path / "copies.npy"), *FAST]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())["knn"]
    # each subset scored alone: the k-NN of a val set that holds only those images
    _csv(tmp_path / "chosen.csv", [(str(workspace / "val" / f"{key}.png"), key.split("/")[0]) for key in chosen])
    alone = _knn(workspace / "backbone.pth", workspace / "train", tmp_path / "chosen.csv")
    assert report["n_queries"] == 12
    for name in ("in keys.txt", "not in copies.npy"):
        assert report["subsets"][name]["n_queries"] == 6
        assert report["subsets"][name]["top1"] == {str(k): v for k, v in alone.top1.items()}
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "top-1 (%), val not in copies.npy (6 images)" in markdown

    np.save(tmp_path / "short.npy", mask[:5])
    with pytest.raises(DataError, match=r"one entry per dataset item \(12\)"):
        read_key_subset(tmp_path / "short.npy", val)
    (tmp_path / "typo.txt").write_text("blue/999\n")
    with pytest.raises(DataError, match="1 keys are not in the dataset"):
        read_key_subset(tmp_path / "typo.txt", val)
