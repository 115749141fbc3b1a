"""Dedup: planted duplicate groups, exact hashes, survivor rule, decontamination, brute force."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from dinoscale.curation import knn
from dinoscale.curation.config import DedupConfig
from dinoscale.curation.dedup import content_hashes, deduplicate, load_dedup_result, save_dedup_result
from dinoscale.curation.dedup_eval import GroundTruth, score_groups
from dinoscale.curation.knn import ListCentroids, n_inverted_lists
from dinoscale.errors import DataError


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def planted_pool(seed: int = 0, n_singletons: int = 200, group_sizes=(2, 3, 4, 5), dim: int = 128):
    """Random (nearly orthogonal) singletons plus groups of noisy copies of one vector each."""
    rng = np.random.default_rng(seed)
    vectors = [unit(rng.standard_normal((n_singletons, dim)))]
    groups = []
    start = n_singletons
    for size in group_sizes:
        center = rng.standard_normal(dim)
        vectors.append(unit(center + 0.3 * rng.standard_normal((size, dim))))
        groups.append(set(range(start, start + size)))
        start += size
    x = np.concatenate(vectors)
    perm = rng.permutation(len(x))  # interleave groups with singletons
    inverse = np.argsort(perm)
    return x[perm], [{int(inverse[i]) for i in g} for g in groups]


def brute_force_groups(x: np.ndarray, k: int, threshold: float) -> list[set[int]]:
    """The walk of the grouping rule, written out: the graph links i and j when one is among the other's
    k nearest (cosine) above threshold; going down the rank (here: the index), an image not yet in a
    group starts one and takes every linked image not yet in a group."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    np.fill_diagonal(sim, -np.inf)
    neighbours = np.argsort(-sim, axis=1)[:, :k]
    adjacency = [set() for _ in range(len(x))]
    for i in range(len(x)):
        for j in neighbours[i]:
            if sim[i, j] > threshold:
                adjacency[i].add(int(j))
                adjacency[int(j)].add(i)
    grouped, groups = set(), []
    for survivor in range(len(x)):
        if survivor in grouped:
            continue
        group = {survivor} | (adjacency[survivor] - grouped)
        grouped |= group
        if len(group) > 1:
            groups.append(group)
    return groups


def as_sets(groups) -> list[set[int]]:
    return sorted((set(map(int, g)) for g in groups), key=min)


def test_planted_near_duplicate_groups_found_exactly():
    x, planted = planted_pool()
    # the construction must really separate: groups above 0.6 inside, below it across
    sim = x @ x.T
    in_group = np.zeros_like(sim, dtype=bool)
    for g in planted:
        idx = np.array(sorted(g))
        in_group[np.ix_(idx, idx)] = True
    np.fill_diagonal(in_group, False)
    off_diagonal = ~np.eye(len(x), dtype=bool)
    assert sim[in_group].min() > 0.6 and sim[~in_group & off_diagonal].max() < 0.6

    result = deduplicate(x, DedupConfig())
    assert as_sets(result.groups) == sorted(planted, key=min)  # recall and precision both 1
    expected_keep = np.ones(len(x), dtype=bool)
    for g in planted:
        expected_keep[sorted(g)[1:]] = False  # without keys or sizes the smallest index survives
    np.testing.assert_array_equal(result.keep, expected_keep)
    assert result.counts["near_duplicates"] == sum(len(g) - 1 for g in planted)
    assert result.counts["kept"] == len(x) - sum(len(g) - 1 for g in planted)


def test_a_chain_of_look_alikes_is_not_one_group():
    """a~b and b~c but a and c far apart: b joins a's group, c stays (connected components would merge all)."""
    rng = np.random.default_rng(1)
    angles = np.deg2rad([0.0, 45.0, 90.0])
    plane = np.zeros((3, 64))
    plane[:, 0], plane[:, 1] = np.cos(angles), np.sin(angles)
    x = np.concatenate([plane, unit(rng.standard_normal((50, 64)))]).astype(np.float32)
    x[3:, :2] = 0  # keep the others away from the plane
    result = deduplicate(x, DedupConfig())
    assert as_sets(result.groups) == [{0, 1}]
    assert result.keep[:3].tolist() == [True, False, True]
    # the middle image is the largest: it survives and takes both ends, each a duplicate of it
    result = deduplicate(x, DedupConfig(), pixel_counts=np.r_[1, 2, 1, np.ones(50)])
    assert as_sets(result.groups) == [{0, 1, 2}] and result.groups[0][0] == 1
    assert result.keep[:3].tolist() == [False, True, False]


def test_every_member_is_a_duplicate_of_its_survivor_and_survivors_are_not_linked():
    rng = np.random.default_rng(11)
    x = unit(np.cumsum(0.25 * rng.standard_normal((400, 32)), axis=0))  # a random walk: long chains
    cfg = DedupConfig(k=8, threshold=0.9)
    result = deduplicate(x, cfg, pixel_counts=rng.integers(1, 5, len(x)))
    assert result.counts["largest_group"] < len(brute_force_components(x, cfg.k, cfg.threshold)[0])
    for group in result.groups:
        assert (x[group[1:]] @ x[group[0]] > cfg.threshold).all()
    kept = np.flatnonzero(result.keep)
    sim = x[kept] @ x[kept].T
    np.fill_diagonal(sim, -1)
    rank_k = np.sort(x @ x.T, axis=1)[:, -cfg.k - 1]  # the k-th neighbour's cosine of each image
    linked = (sim > cfg.threshold) & ((sim >= rank_k[kept][:, None]) | (sim >= rank_k[kept][None, :]))
    assert not linked.any()


def brute_force_components(x: np.ndarray, k: int, threshold: float) -> list[set[int]]:
    """Connected components (largest first) of the same graph: what the grouping rule must not do."""
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    neighbours = np.argsort(-sim, axis=1)[:, :k]
    label = list(range(len(x)))

    def root(i: int) -> int:
        while label[i] != i:
            i = label[i]
        return i

    for i in range(len(x)):
        for j in neighbours[i]:
            if sim[i, j] > threshold:
                label[root(int(j))] = root(i)
    components: dict[int, set[int]] = {}
    for i in range(len(x)):
        components.setdefault(root(i), set()).add(i)
    return sorted(components.values(), key=len, reverse=True)


def test_exact_hash_duplicates_all_found():
    rng = np.random.default_rng(2)
    x = unit(rng.standard_normal((40, 128)))  # unrelated embeddings: only the hashes link items
    hashes = [f"{i:064x}" for i in range(40)]
    copies = {3: [10, 25], 7: [8], 30: [31, 32, 39]}
    for original, dups in copies.items():
        for d in dups:
            hashes[d] = hashes[original]
    for given in (hashes, np.array(hashes, dtype="S64"), [h.encode() for h in hashes]):  # text, a store's bytes
        result = deduplicate(x, DedupConfig(), hashes=given)
        assert as_sets(result.groups) == sorted(({o, *d} for o, d in copies.items()), key=min)
        assert result.counts["exact_duplicates"] == 6
        assert result.counts["near_duplicates"] == 0
        assert set(np.flatnonzero(~result.keep)) == {10, 25, 8, 31, 32, 39}

    off = deduplicate(x, DedupConfig(exact=False), hashes=hashes)
    assert off.keep.all()


def test_content_hashes_of_bytes():
    blobs = [b"a", b"b", b"a"]
    assert content_hashes(blobs.__getitem__, 3) == [hashlib.sha256(b).hexdigest() for b in blobs]
    x = unit(np.random.default_rng(3).standard_normal((3, 32)))
    result = deduplicate(x, DedupConfig(), hashes=blobs.__getitem__)
    assert result.keep.tolist() == [True, True, False]


def test_survivor_is_largest_image_then_smallest_key():
    x, planted = planted_pool(seed=4, group_sizes=(4,))
    group = sorted(planted[0])
    keys = [f"key{i:04d}" for i in range(len(x))][::-1]  # smallest key = largest index
    pixels = np.full(len(x), 100)
    pixels[group[0]] = pixels[group[2]] = 500  # two largest, tie broken by key
    result = deduplicate(x, DedupConfig(), pixel_counts=pixels, keys=keys)
    winner = max(group[0], group[2])  # reversed keys: the larger index has the smaller key
    assert [i for i in group if result.keep[i]] == [winner]
    assert result.groups[0][0] == winner

    # the same items in another order keep the same survivor (by key)
    perm = np.random.default_rng(5).permutation(len(x))
    shuffled = deduplicate(x[perm], DedupConfig(), pixel_counts=pixels[perm], keys=[keys[i] for i in perm])
    assert {keys[perm[i]] for i in np.flatnonzero(shuffled.keep)} == {keys[i] for i in np.flatnonzero(result.keep)}


def test_decontamination_drops_whole_components():
    x, planted = planted_pool(seed=6)
    target = sorted(planted[2])  # a group of 4
    other = sorted(planted[1])
    rng = np.random.default_rng(7)
    touched = x[target[1]]
    basis, _ = np.linalg.qr(x[target].T)  # orthonormal basis of the group's span
    orthogonal = rng.standard_normal(x.shape[1])
    orthogonal = unit(orthogonal - basis @ (basis.T @ orthogonal))
    reference = unit(0.47 * touched + np.sqrt(1 - 0.47**2) * orthogonal)[None]  # cosine 0.47 to one member
    cosines = x @ reference[0]
    above = set(np.flatnonzero(cosines > 0.45))
    assert target[1] in above and above <= set(target) and len(above) < len(target)

    result = deduplicate(x, DedupConfig(), reference_sets=[reference])
    assert set(np.flatnonzero(result.contaminated)) == set(target)
    assert not result.keep[target].any()
    assert result.keep[other[0]] and not result.keep[other[1:]].any()
    assert result.counts["contaminated_removed"] == 1
    assert result.counts["contaminated_items"] == len(target)

    strict = deduplicate(x, DedupConfig(decontamination_threshold=0.6), reference_sets=[reference])
    assert not strict.contaminated.any()


@pytest.mark.parametrize("ivf", [False, True])
def test_matches_brute_force_cosine_graph(ivf: bool, monkeypatch):
    """Clustered data where k limits the graph: faiss (flat, or IVF probing every list, its rows put in
    lists 7 at a time) and the rounds of `survivor_states` give the groups of the walk written out in numpy."""
    monkeypatch.setattr(knn, "SCORE_CHUNK_BYTES", 4 * n_inverted_lists(600) * 7)
    rng = np.random.default_rng(8)
    centers = rng.standard_normal((30, 48))
    x = unit(centers[rng.integers(0, 30, 600)] + 0.9 * rng.standard_normal((600, 48)))
    k, threshold = 5, 0.5
    cfg = DedupConfig(k=k, threshold=threshold, ivf_min_size=100 if ivf else 10**9, nprobe=10**6)
    result = deduplicate(x, cfg)
    expected = brute_force_groups(x, k, threshold)
    assert len(expected) > 10 and max(len(g) for g in brute_force_components(x, k, threshold)) > k + 1
    assert as_sets(result.groups) == sorted(expected, key=min)
    expected_keep = np.ones(len(x), dtype=bool)
    for g in expected:
        expected_keep[sorted(g)[1:]] = False
    np.testing.assert_array_equal(result.keep, expected_keep)


def test_list_centroids_find_the_nearest_by_l2_distance_in_chunks_of_rows(monkeypatch):
    rng = np.random.default_rng(3)
    rows, centroids = rng.standard_normal((50, 16)).astype(np.float32), rng.standard_normal((9, 16)).astype(np.float32)
    distances = ((rows[:, None, :].astype(np.float64) - centroids[None]) ** 2).sum(-1)
    monkeypatch.setattr(knn, "SCORE_CHUNK_BYTES", 4 * 9 * 4)  # 4 rows at a time
    np.testing.assert_array_equal(ListCentroids(centroids).nearest(rows, 3), np.argsort(distances, axis=1)[:, :3])
    assert ListCentroids(centroids).nearest(rows[:0], 3).shape == (0, 3)


def test_save_and_load_round_trip(tmp_path):
    x, _ = planted_pool(seed=9)
    result = deduplicate(x, DedupConfig())
    save_dedup_result(result, tmp_path / "dedup")
    loaded = load_dedup_result(tmp_path / "dedup")
    np.testing.assert_array_equal(loaded.keep, result.keep)
    np.testing.assert_array_equal(loaded.contaminated, result.contaminated)
    assert [g.tolist() for g in loaded.groups] == [g.tolist() for g in result.groups]
    assert loaded.counts == result.counts


def test_user_errors():
    x = unit(np.random.default_rng(10).standard_normal((5, 16)))
    with pytest.raises(DataError, match="content hashes"):
        deduplicate(x, DedupConfig(), hashes=["a"] * 4)
    with pytest.raises(DataError, match="same backbone"):
        deduplicate(x, DedupConfig(), reference_sets=[np.ones((2, 8), dtype=np.float32)])
    with pytest.raises(DataError, match="2-D"):
        deduplicate(x[0], DedupConfig())
    with pytest.raises(DataError, match="run the dedup stage"):
        load_dedup_result("nowhere")


def test_pairwise_scores_count_pairs_by_their_definition():
    """Precision and recall over item pairs, computed by hand on a small truth: pictures A (a source at two
    sizes and a jpeg copy), B and C (look-alikes of each other) and D."""
    truth = GroundTruth(picture=np.array(["A", "A", "A", "B", "C", "D"]),
                        origin=np.array(["source", "source", "jpeg", "source", "source", "source"]),
                        source=np.array([0, 1, 0, 3, 4, 5]), lookalikes={("B", "C")})
    groups = [np.array([0, 2, 5]), np.array([3, 4])]  # A0+copy (true), A0-D and copy-D (false); B-C left out
    scores = score_groups(groups, truth)
    assert scores["true_pairs"] == 3  # (0,1) original, (0,2) jpeg, (1,2) indirect
    assert scores["found_pairs"] == 3 and scores["false_pairs"] == 2
    assert scores["precision"] == pytest.approx(1 / 3) and scores["recall"] == pytest.approx(1 / 3)
    assert scores["mixed_groups"] == 1 and scores["lookalike_pairs_merged"] == 1
    kinds = scores["per_kind"]
    assert kinds["jpeg"]["recall"] == 1.0 and kinds["jpeg"]["false_pairs"] == 1  # the copy paired with D
    assert kinds["original"]["recall"] == 0.0 and kinds["original"]["false_pairs"] == 2
    assert kinds["indirect"]["precision"] is None


def test_faiss_indexes_take_the_ranks_own_gpu_under_a_process_group(monkeypatch):
    """Where faiss sees GPUs, a single process spreads an index over all of them, and each of several
    ranks puts it on its own GPU only (8 ranks on a node must not each fill all 8)."""
    import faiss

    from dinoscale.curation import faiss_utils

    calls = []
    monkeypatch.setattr(faiss_utils, "gpu_available", lambda: True)
    monkeypatch.setattr(faiss_utils, "_gpu_resources", lambda: "resources")
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index: calls.append("all") or index, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, device, index: calls.append((res, device)) or index,
                        raising=False)
    monkeypatch.setattr(faiss_utils.torch.cuda, "current_device", lambda: 3)
    index = faiss.IndexFlatL2(4)
    assert faiss_utils.on_device(index) is index and calls == ["all"]
    monkeypatch.setattr(faiss_utils.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(faiss_utils.dist, "get_world_size", lambda: 8)
    faiss_utils.on_device(index)
    assert calls == ["all", ("resources", 3)]
