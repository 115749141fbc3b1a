"""Scoring duplicate groups against ground truth: pairwise precision and recall, per edit type.

Every pair of pool items is a true pair (same picture), a false pair (different pictures), or,
for pictures the truth calls look-alike, neither (left out of both figures). Found pairs are
the pairs inside the found groups. Precision = found true pairs / found true-or-false pairs;
recall = found true pairs / true pairs.

A true pair's kind is the edit that made the copy in it when the other is the copy's own source
(`jpeg`, `crop`, ...), `original` for two source files of one picture (the same icon at two
sizes), and `indirect` for the rest (a copy and another size of its source, two copies). A false
pair counts against the edit of each copy in it, or `original`. A group that
holds two pictures that are neither the same nor look-alike is `mixed`: the failure that
connected components produce on chains of look-alikes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations
from typing import Iterable, Sequence

import numpy as np

SOURCE = "source"
INDIRECT = "indirect"  # no false pair is charged to it, so it has no precision


@dataclass
class GroundTruth:
    """Per pool item: the picture it shows, how it was made (`source` or an edit) and from which item."""

    picture: np.ndarray  # (N,) str
    origin: np.ndarray  # (N,) str
    source: np.ndarray  # (N,) int: the item a copy was made from; sources give their own index
    lookalikes: set[tuple[str, str]] = field(default_factory=set)  # sorted picture pairs left out of scoring

    def status(self, i: int, j: int) -> str:
        a, b = self.picture[i], self.picture[j]
        if a == b:
            return "true"
        return "lookalike" if (min(a, b), max(a, b)) in self.lookalikes else "false"

    def kind(self, i: int, j: int) -> str:
        if self.source[i] == j:
            return str(self.origin[i])
        if self.source[j] == i:
            return str(self.origin[j])
        return "original" if self.origin[i] == self.origin[j] == SOURCE else INDIRECT


def truth_from_real_set(real_set: dict, keys: Sequence[str]) -> GroundTruth:
    """The GroundTruth of a pool opened from a real-image set (`data.real_images`), in pool order."""
    items = real_set["items"]
    position = {key: i for i, key in enumerate(keys)}
    return GroundTruth(np.array([items[k]["picture"] for k in keys]), np.array([items[k]["origin"] for k in keys]),
                       np.array([position[items[k]["source"]] for k in keys]),
                       {tuple(pair) for pair in real_set["lookalike_pictures"]})


def true_pairs_by_kind(truth: GroundTruth, valid: np.ndarray | None = None) -> Counter[str]:
    """How many true pairs of each kind the (valid) pool holds."""
    indices = np.arange(len(truth.picture)) if valid is None else np.flatnonzero(valid)
    by_picture: dict[str, list[int]] = {}
    for i in indices:
        by_picture.setdefault(truth.picture[i], []).append(int(i))
    counts: Counter[str] = Counter()
    for members in by_picture.values():
        counts.update(truth.kind(i, j) for i, j in combinations(members, 2))
    return counts


def score_groups(groups: Iterable[np.ndarray], truth: GroundTruth, valid: np.ndarray | None = None) -> dict:
    """Pairwise precision and recall of `groups` (arrays of pool indices), overall and per kind, the
    mixed groups and the look-alike pairs merged."""
    true_total = true_pairs_by_kind(truth, valid)
    hits: Counter[str] = Counter()
    false: Counter[str] = Counter()
    n_false, lookalike_pairs, mixed, sizes = 0, 0, 0, []
    for group in groups:
        sizes.append(len(group))
        group_is_mixed = False
        for i, j in combinations(map(int, group), 2):
            status = truth.status(i, j)
            if status == "true":
                hits[truth.kind(i, j)] += 1
            elif status == "lookalike":
                lookalike_pairs += 1
            else:
                group_is_mixed = True
                n_false += 1
                false.update({truth.origin[k] if truth.origin[k] != SOURCE else "original" for k in (i, j)})
        mixed += group_is_mixed
    n_hits = sum(hits.values())
    per_kind = {}
    for kind in sorted(set(true_total) | set(false)):
        found = hits[kind] + false[kind]
        per_kind[kind] = {"true_pairs": true_total[kind], "found_true_pairs": hits[kind], "false_pairs": false[kind],
                          "recall": hits[kind] / true_total[kind] if true_total[kind] else None,
                          "precision": hits[kind] / found if found and kind != INDIRECT else None}
    return {
        "precision": n_hits / (n_hits + n_false) if n_hits + n_false else 1.0,
        "recall": n_hits / max(sum(true_total.values()), 1),
        "true_pairs": sum(true_total.values()), "found_pairs": n_hits + n_false, "false_pairs": n_false,
        "lookalike_pairs_merged": lookalike_pairs, "groups": len(sizes), "mixed_groups": mixed,
        "largest_group": max(sizes, default=1), "per_kind": per_kind,
    }
