"""Weighted k-NN (DINO protocol) against a brute force written from the definition."""

import math

import numpy as np
import pytest
import torch

from dinoscale.errors import DataError
from dinoscale.eval.knn import knn_classify, knn_search


def lattice_features(n: int, seed: int) -> torch.Tensor:
    """Unit vectors with entries +-0.25 in 16-D: normalisation and dot products are exact, similarities tie often."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.choice([-0.25, 0.25], size=(n, 16))).float()


def brute_force_neighbours(train: np.ndarray, query: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    """Indices of the k most similar bank items (ties: lower index first) and all similarities."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    query = query / np.linalg.norm(query)
    sims = train.astype(np.float64) @ query.astype(np.float64)
    return sorted(range(len(train)), key=lambda i: (-sims[i], i))[:k], sims


def brute_force_accuracy(train, train_labels, test, test_labels, k, temperature, n_classes):
    train, test = train.numpy().astype(np.float64), test.numpy().astype(np.float64)
    top1 = top5 = 0
    for query, target in zip(test, test_labels.tolist()):
        neighbours, sims = brute_force_neighbours(train, query, k)
        votes = [0.0] * n_classes
        for i in neighbours:
            votes[int(train_labels[i])] += math.exp(sims[i] / temperature)
        ranking = sorted(range(n_classes), key=lambda c: (-votes[c], c))
        top1 += ranking[0] == target
        top5 += target in ranking[:5]
    return 100.0 * top1 / len(test), 100.0 * top5 / len(test)


def long_tailed_labels(n: int, n_classes: int, seed: int) -> torch.Tensor:
    """Class c has about twice the items of class c+1; the last classes have only a few."""
    rng = np.random.default_rng(seed)
    weights = 0.5 ** np.arange(n_classes)
    return torch.from_numpy(rng.choice(n_classes, size=n, p=weights / weights.sum()))


@pytest.mark.parametrize("bank_chunk", [7, 64, 10_000])
def test_search_matches_brute_force_with_ties(bank_chunk):
    bank, queries = lattice_features(300, 0), lattice_features(40, 1)
    sims, idx = knn_search(queries, bank, k=25, bank_chunk_size=bank_chunk)
    for q in range(len(queries)):
        expected, expected_sims = brute_force_neighbours(bank.numpy(), queries[q].numpy(), 25)
        assert idx[q].tolist() == expected
        np.testing.assert_array_equal(sims[q].numpy(), expected_sims[expected].astype(np.float32))


def test_lattice_features_really_tie():
    bank, queries = lattice_features(300, 0), lattice_features(40, 1)
    sims = (queries @ bank.T).numpy()
    kth = -np.sort(-sims, axis=1)[:, 24:26]
    assert (kth[:, 0] == kth[:, 1]).mean() > 0.5  # the k-th and (k+1)-th neighbour tie for most queries


def test_accuracy_matches_brute_force_with_ties_and_small_classes():
    bank, queries = lattice_features(300, 2), lattice_features(60, 3)
    n_classes = 8
    bank_labels = long_tailed_labels(300, n_classes, 4)
    query_labels = long_tailed_labels(60, n_classes, 5)
    assert torch.bincount(bank_labels, minlength=n_classes).min() < 10  # k larger than some classes
    ks = (1, 10, 20, 100, 200, 500)  # 500 > bank size: the whole bank votes
    result = knn_classify(bank, bank_labels, queries, query_labels, ks, 0.07, n_classes,
                          query_chunk_size=16, bank_chunk_size=50)
    for k in ks:
        top1, top5 = brute_force_accuracy(bank, bank_labels, queries, query_labels, min(k, 300), 0.07, n_classes)
        assert result.top1[k] == pytest.approx(top1)
        assert result.top5[k] == pytest.approx(top5)


def test_accuracy_matches_brute_force_on_random_features():
    g = torch.Generator().manual_seed(0)
    n_classes = 5
    centres = torch.randn(n_classes, 24, generator=g)
    bank_labels = long_tailed_labels(500, n_classes, 6)
    query_labels = torch.randint(0, n_classes, (120,), generator=g)
    bank = centres[bank_labels] + 1.5 * torch.randn(500, 24, generator=g)
    queries = centres[query_labels] + 1.5 * torch.randn(120, 24, generator=g)
    result = knn_classify(bank, bank_labels, queries, query_labels, (10, 20, 100, 200), 0.07)
    for k in (10, 20, 100, 200):
        top1, top5 = brute_force_accuracy(bank, bank_labels, queries, query_labels, k, 0.07, n_classes)
        # float32 vs float64 may swap two neighbours whose similarities differ by ~1e-7: allow one query
        assert abs(result.top1[k] - top1) <= 100 / 120 + 1e-9
        assert abs(result.top5[k] - top5) <= 100 / 120 + 1e-9
    assert 40 < result.top1[20] < 100  # informative features, not a degenerate case


@pytest.mark.parametrize("features", ["lattice", "gaussian"])
def test_chunked_equals_unchunked(features):
    if features == "lattice":
        bank, queries = lattice_features(400, 7), lattice_features(90, 8)
    else:
        g = torch.Generator().manual_seed(1)
        bank, queries = torch.randn(400, 32, generator=g), torch.randn(90, 32, generator=g)
    bank_labels, query_labels = long_tailed_labels(400, 6, 9), long_tailed_labels(90, 6, 10)
    full = knn_classify(bank, bank_labels, queries, query_labels, query_chunk_size=10_000, bank_chunk_size=10_000)
    for q_chunk, b_chunk in [(90, 1), (1, 400), (7, 33), (64, 150), (90, 399)]:
        chunked = knn_classify(bank, bank_labels, queries, query_labels,
                               query_chunk_size=q_chunk, bank_chunk_size=b_chunk)
        assert chunked.as_dict() == full.as_dict()
    sims_full, idx_full = knn_search(queries, bank, 200, bank_chunk_size=10_000)
    sims_chunk, idx_chunk = knn_search(queries, bank, 200, bank_chunk_size=13)
    assert torch.equal(idx_full, idx_chunk)
    torch.testing.assert_close(sims_full, sims_chunk)


def test_top5_with_fewer_than_five_classes_is_perfect():
    g = torch.Generator().manual_seed(2)
    bank, queries = torch.randn(50, 8, generator=g), torch.randn(20, 8, generator=g)
    result = knn_classify(bank, torch.randint(0, 3, (50,), generator=g), queries,
                          torch.randint(0, 3, (20,), generator=g), ks=(10,))
    assert result.top5[10] == 100.0


def test_separated_clusters_are_classified_perfectly():
    g = torch.Generator().manual_seed(3)
    centres = torch.eye(4, 16) * 10
    bank_labels, query_labels = torch.arange(40) % 4, torch.arange(12) % 4
    bank = centres[bank_labels] + torch.randn(40, 16, generator=g)
    queries = centres[query_labels] + torch.randn(12, 16, generator=g)
    result = knn_classify(bank, bank_labels, queries, query_labels, ks=(10,))
    assert result.top1[10] == 100.0


@pytest.mark.parametrize("bad", ["width", "labels", "k", "temperature"])
def test_user_mistakes_raise_data_error(bad):
    bank, labels = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    queries, query_labels = torch.randn(3, 4), torch.zeros(3, dtype=torch.long)
    kwargs = {"ks": (5,), "temperature": 0.07}
    if bad == "width":
        queries = torch.randn(3, 5)
    elif bad == "labels":
        labels = labels[:9]
    elif bad == "k":
        kwargs["ks"] = (0,)
    else:
        kwargs["temperature"] = 0.0
    with pytest.raises(DataError):
        knn_classify(bank, labels, queries, query_labels, **kwargs)
