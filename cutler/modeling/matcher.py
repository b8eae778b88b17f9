"""Matching predictions to ground truth by IoU (Detectron2's ``Matcher`` semantics)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor


class Matcher:
    """Assign each prediction (column) to its best ground-truth box (row) and a label by IoU band.

    ``thresholds=[0.3, 0.7]``, ``labels=[0, -1, 1]`` means IoU < 0.3 -> 0 (background),
    [0.3, 0.7) -> -1 (ignored), >= 0.7 -> 1 (foreground). With ``allow_low_quality_matches`` every
    prediction that ties for the highest IoU with some ground truth is labelled 1 as well.
    """

    def __init__(self, thresholds: Sequence[float], labels: Sequence[int], allow_low_quality_matches: bool = False):
        thresholds = [float(t) for t in thresholds]
        if any(a > b for a, b in zip(thresholds[:-1], thresholds[1:])):
            raise ValueError(f"Matcher thresholds must be sorted, got {thresholds}")
        if len(labels) != len(thresholds) + 1:
            raise ValueError(f"Matcher needs len(labels) == len(thresholds) + 1, got {labels} / {thresholds}")
        self.thresholds: List[float] = [-float("inf")] + thresholds + [float("inf")]
        self.labels = [int(label) for label in labels]
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, match_quality_matrix: Tensor) -> Tuple[Tensor, Tensor]:
        """Match an ``(M ground truth, N predictions)`` IoU matrix.

        Returns:
            matches: ``(N,)`` int64 index of the matched ground truth (0 when M == 0).
            match_labels: ``(N,)`` int8 label of each prediction.
        """
        m, n = match_quality_matrix.shape
        device = match_quality_matrix.device
        if m == 0:
            matches = torch.zeros(n, dtype=torch.int64, device=device)
            return matches, torch.full((n,), self.labels[0], dtype=torch.int8, device=device)
        matched_vals, matches = match_quality_matrix.max(dim=0)
        match_labels = torch.ones(n, dtype=torch.int8, device=device)
        for label, low, high in zip(self.labels, self.thresholds[:-1], self.thresholds[1:]):
            band = (matched_vals >= low) & (matched_vals < high)
            match_labels[band] = label
        if self.allow_low_quality_matches:
            best_per_gt = match_quality_matrix.max(dim=1).values
            _, pred_idx = torch.nonzero(match_quality_matrix == best_per_gt[:, None], as_tuple=True)
            match_labels[pred_idx] = 1
        return matches, match_labels
