"""A plain sequential implementation of UnSAM's iterative merging, one pair at a time, kept as the reference
that the batched device implementation (:func:`cutler.unsam.merging.iterative_merge`) must reproduce.

It follows the published algorithm step by step (a dictionary of adjacent-cluster similarities; take the
maximum; stop the level below the threshold; merge; recompute the similarities of the merged cluster with its
neighbours), with the two conventions the library documents: exact integer cluster sums with the similarity
``dot / sqrt(|a|^2 |b|^2)`` in float64, and ties broken by the smallest (smaller id, larger id), a cluster's
id being its smallest patch index. Pure Python and numpy, no torch: nothing is shared with the code under test
except the quantized input features.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Set, Tuple

import numpy as np


def cosine(dot: int, norm_a: int, norm_b: int) -> float:
    """The similarity of two cluster sums from their exact integer dot product and squared norms."""
    if norm_a == 0 or norm_b == 0:
        return 0.0
    return float(dot) / math.sqrt(float(norm_a) * float(norm_b))


def iterative_merge_reference(features: np.ndarray, grid_hw: Tuple[int, int],
                              thresholds: Sequence[float]) -> np.ndarray:
    """Sequential merging of one crop.

    Args:
        features: ``(N, C)`` integer-valued patch features (row-major grid).
        grid_hw: ``(h, w)``.
        thresholds: decreasing thresholds, finest first.

    Returns:
        ``(L, N)`` int64: each patch's cluster id (smallest patch index of its cluster) after each level.
    """
    h, w = grid_hw
    n = h * w
    feats = np.asarray(features).astype(np.int64)
    assert np.array_equal(feats, np.asarray(features)), "features must be integer-valued"
    sums: Dict[int, np.ndarray] = {p: feats[p].copy() for p in range(n)}
    members: Dict[int, List[int]] = {p: [p] for p in range(n)}
    neighbours: Dict[int, Set[int]] = {p: set() for p in range(n)}
    for y in range(h):
        for x in range(w):
            p = y * w + x
            if x + 1 < w:
                neighbours[p].add(p + 1)
                neighbours[p + 1].add(p)
            if y + 1 < h:
                neighbours[p].add(p + w)
                neighbours[p + w].add(p)

    def sim(a: int, b: int) -> float:
        return cosine(int(sums[a] @ sums[b]), int(sums[a] @ sums[a]), int(sums[b] @ sums[b]))

    similarities: Dict[Tuple[int, int], float] = {}
    for a in range(n):
        for b in neighbours[a]:
            if a < b:
                similarities[(a, b)] = sim(a, b)

    levels = []
    for theta in thresholds:
        while similarities:
            # highest similarity first; among equal ones the smallest (a, b)
            a, b = max(similarities, key=lambda k: (similarities[k], -k[0], -k[1]))
            if similarities[(a, b)] < theta:
                break
            # merge b into a (a < b: the merged cluster keeps the smaller id)
            for nb in neighbours[b]:
                similarities.pop((min(nb, b), max(nb, b)), None)
                if nb != a:
                    neighbours[nb].discard(b)
                    neighbours[nb].add(a)
            for nb in neighbours[a]:
                similarities.pop((min(nb, a), max(nb, a)), None)
            neighbours[a] = (neighbours[a] | neighbours[b]) - {a, b}
            del neighbours[b]
            sums[a] = sums[a] + sums.pop(b)
            members[a] += members.pop(b)
            for nb in neighbours[a]:
                similarities[(min(nb, a), max(nb, a))] = sim(a, nb)
        labels = np.empty(n, dtype=np.int64)
        for cid, ps in members.items():
            labels[ps] = cid
        levels.append(labels)
    return np.stack(levels)
