"""Dedup on real images: a seeded subset of the real-image set (oxygen icons, wallpapers, scikit-image
photos with planted copies), through the embed and dedup stages of `curate/small`."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from dinoscale.config import load_config
from dinoscale.curation import pipeline
from dinoscale.curation.copy_descriptor import CALIBRATIONS
from dinoscale.curation.dedup import check_threshold, deduplicate, load_dedup_result
from dinoscale.curation.dedup_eval import score_groups, truth_from_real_set
from dinoscale.curation.store import RowStore
from dinoscale.data.pool import open_pool
from dinoscale.data.real_images import OXYGEN_ROOT, RealSetSpec, build_real_set, load_real_set
from dinoscale.errors import ConfigError

pytestmark = pytest.mark.skipif(not OXYGEN_ROOT.is_dir(), reason="oxygen-icon-theme is not installed "
                                "(.ci/install_datasets.sh installs it)")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """The set (150 pictures at all their sizes, with copies) after the embed and dedup stages."""
    root = tmp_path_factory.mktemp("real")
    build_real_set(root, RealSetSpec(max_pictures=150, seed=3))
    cfg = load_config("curate/small", [f"curation.pool={root / 'pool'}", f"curation.output_dir={root / 'run'}"])
    for stage in ("embed", "dedup"):
        pipeline.run_stage(cfg, stage)
    pool = open_pool(root / "pool")
    return {"cfg": cfg, "pool": pool, "truth": truth_from_real_set(load_real_set(root), pool.keys),
            "x": np.asarray(RowStore.open(root / "run" / "embed", "copy_embeddings"), dtype=np.float32),
            "valid": np.asarray(RowStore.open(root / "run" / "embed", "valid")),
            "pixels": np.asarray(RowStore.open(root / "run" / "embed", "pixel_counts")),
            "dedup": load_dedup_result(root / "run" / "dedup"), "report": root / "run" / "dedup" / "report.html"}


def test_the_set_scores_sizes_of_one_icon_as_duplicates(real_run):
    truth, pool = real_run["truth"], real_run["pool"]
    origins = set(truth.origin)
    assert {"source", "jpeg", "crop", "caption", "pad"} <= origins
    pictures, counts = np.unique(truth.picture[truth.origin == "source"], return_counts=True)
    assert counts.max() >= 5  # an icon at 5 or more sizes: one picture
    many = pictures[counts.argmax()]
    sides = {pool.load(int(i)).size for i in np.flatnonzero((truth.picture == many) & (truth.origin == "source"))}
    assert len(sides) == counts.max()


def test_a_chain_of_real_look_alikes_is_not_merged_into_one_group(real_run):
    """At a loose cosine the k-NN graph of real icons holds chains of different pictures: connected
    components would put pictures far apart into one group. Every group must hold only images above
    the threshold to its kept image, and so never a whole chain."""
    x, truth, valid = real_run["x"], real_run["truth"], real_run["valid"]
    cfg = load_config("curate/small").curation.dedup
    cfg.threshold = 0.9
    result = deduplicate(x, cfg, pixel_counts=real_run["pixels"])
    similarity = x @ x.T
    linked = similarity > cfg.threshold
    np.fill_diagonal(linked, False)
    component = _components(linked & valid[:, None] & valid[None, :])
    chained = [c for c in np.unique(component) if _has_far_different_pictures(np.flatnonzero(component == c),
                                                                                 similarity, truth, cfg.threshold)]
    assert chained, "the real subset has no chain of look-alikes at this cosine; the test would prove nothing"
    for group in result.groups:
        assert (similarity[group[0], group[1:]] > cfg.threshold).all()
    assert result.counts["largest_group"] < max(np.bincount(component))


def test_default_precision_holds_the_calibrated_level(real_run):
    """`curate/small` (the descriptor at its calibrated cosine) is at least as precise on this subset as
    it measured on the whole real-image set, and its groups hold only copies of the kept image."""
    cfg = real_run["cfg"].curation.dedup
    scores = score_groups(real_run["dedup"].groups, real_run["truth"], real_run["valid"])
    calibrated_precision, calibrated_recall = CALIBRATIONS["descriptor"].at(cfg.threshold)
    assert scores["precision"] >= calibrated_precision, scores
    assert scores["recall"] >= calibrated_recall - 0.1, scores
    assert scores["per_kind"]["exact"]["recall"] == 1.0
    x = real_run["x"]
    for group in real_run["dedup"].groups:  # exact copies have their image's embedding
        assert (x[group[1:]] @ x[group[0]] > cfg.threshold).all()
    html = real_run["report"].read_text()
    assert "largest groups" in html and "drawn at random" in html and "exact copies" in html


def test_thresholds_outside_the_working_range_are_refused_or_warned(caplog):
    low, high = CALIBRATIONS["descriptor"].working_range
    with pytest.raises(ConfigError, match="would not be copies"):
        check_threshold("descriptor", CALIBRATIONS["descriptor"].refuse_below - 0.01)
    check_threshold("descriptor", (low + high) / 2)
    assert not caplog.records
    check_threshold("descriptor", CALIBRATIONS["descriptor"].refuse_below + 0.001)
    assert "merges different pictures" in caplog.text and "precision" in caplog.text
    check_threshold("path/to/copy_model.pt", 0.1)  # a user's model: its range is not known here


def _components(adjacency: np.ndarray) -> np.ndarray:
    label = np.arange(len(adjacency))
    while True:
        neighbour_min = np.where(adjacency, label[None, :], len(label)).min(1)
        new = np.minimum(label, neighbour_min)
        new = new[new]
        if np.array_equal(new, label):
            return label
        label = new


def _has_far_different_pictures(members: np.ndarray, similarity: np.ndarray, truth, threshold: float) -> bool:
    return any(truth.status(a, b) == "false" and similarity[a, b] < threshold - 0.1
               for a, b in combinations(members.tolist(), 2))
