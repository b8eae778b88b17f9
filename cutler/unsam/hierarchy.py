"""Hierarchies of pseudo-masks: cluster trees from merged levels, mask NMS, and parent bookkeeping.

Levels are numbered as in the UnSAM paper: level 0 is a divide (detector) mask, level 1 the partition at the
lowest merging threshold (0.1, the coarsest parts) and level ``L`` the one at the highest (0.6, the finest).
A cluster that persists unchanged over several levels is one node; it records the coarsest level at which it
exists (``level``) and the finest (``finest_level``). Its parent is the cluster that contains it one level
coarser (a strictly larger cluster), or the divide mask for the clusters of level 1. Parents therefore always
have a smaller ``level`` than their children.

When masks are removed later (mask NMS, refinement), the survivors keep a consistent tree: a removed node is
stood in for by the mask that suppressed it (it was a near-duplicate) or, for a node removed without a
replacement, skipped; :func:`resolve_parents` walks up to the nearest surviving stand-in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np


@dataclass
class PartNode:
    """One cluster of a crop's merge hierarchy.

    Attributes:
        patches: ``(h, w)`` bool patch mask.
        level: the coarsest level (1 = lowest threshold) at which the cluster exists.
        finest_level: the finest level at which it exists (``>= level``).
        parent: index of the parent node in the same list, or -1 for the crop's divide mask.
    """

    patches: np.ndarray
    level: int
    finest_level: int
    parent: int


def cluster_tree(level_labels: np.ndarray, grid_hw: Tuple[int, int], min_patches: int = 1) -> List[PartNode]:
    """The nodes of one crop's hierarchy, parents before children.

    Args:
        level_labels: ``(L, N)`` cluster ids (smallest patch index of the cluster) after each level, in merging
            order (finest threshold first), as :func:`cutler.unsam.merging.iterative_merge` returns per crop.
        grid_hw: the patch grid ``(h, w)``, ``h * w = N``.
        min_patches: clusters with fewer patches are not nodes (the published code keeps 4 and more); their
            parents are larger, so no kept node loses its parent.

    Returns:
        Nodes ordered by ``level`` then by cluster id.
    """
    labels = np.asarray(level_labels)
    num_levels, n = labels.shape
    h, w = grid_hw
    if h * w != n:
        raise ValueError(f"grid {h}x{w} does not hold {n} patches")
    nodes: List[PartNode] = []
    index = {}  # (cluster id, size) -> node index: clusters only grow, so id and size identify the patch set
    previous = None  # (labels, sizes) of the next coarser level
    for level in range(1, num_levels + 1):
        lab = labels[num_levels - level]
        sizes = np.bincount(lab, minlength=n)
        for cid in np.flatnonzero(sizes >= max(min_patches, 1)):
            key = (int(cid), int(sizes[cid]))
            if key in index:
                nodes[index[key]].finest_level = level
                continue
            parent = -1
            if previous is not None:
                plab, psizes = previous
                parent = index[(int(plab[cid]), int(psizes[plab[cid]]))]
            index[key] = len(nodes)
            nodes.append(PartNode((lab == cid).reshape(h, w), level, level, parent))
        previous = (lab, sizes)
    return nodes


def nms_order(levels: Sequence[int], areas: Sequence[float]) -> np.ndarray:
    """The order in which mask NMS visits masks: coarser level first, then larger area, then input order.

    A parent has a smaller level than its children, so a near-duplicate child is the one suppressed.
    """
    levels = np.asarray(levels, dtype=np.int64)
    areas = np.asarray(areas, dtype=np.float64)
    return np.lexsort((np.arange(len(levels)), -areas, levels))


def mask_nms(ious: np.ndarray, order: Sequence[int], iou_thresh: float) -> Tuple[np.ndarray, np.ndarray]:
    """Greedy non-maximum suppression of masks.

    Args:
        ious: ``(n, n)`` pairwise mask IoU.
        order: visiting order (best first), e.g. :func:`nms_order`.
        iou_thresh: a mask whose IoU with an already kept one is ``> iou_thresh`` is suppressed.

    Returns:
        ``(keep, suppressed_by)``: ``(n,)`` bool, and ``(n,)`` int64 index of the kept mask that suppressed
        each mask (-1 for kept ones).
    """
    n = len(order)
    keep = np.zeros(n, dtype=bool)
    suppressed_by = np.full(n, -1, dtype=np.int64)
    for i in order:
        if suppressed_by[i] >= 0:
            continue
        keep[i] = True
        hit = (ious[i] > iou_thresh) & ~keep & (suppressed_by < 0)
        hit[i] = False
        suppressed_by[hit] = i
    return keep, suppressed_by


def _is_self_or_descendant(node: int, ancestor: int, parent: Sequence[int]) -> bool:
    seen = set()
    while node != -1 and node not in seen:
        if node == ancestor:
            return True
        seen.add(node)
        node = parent[node]
    return False


def resolve_parents(parent: Sequence[int], alive: Sequence[bool], replaced_by: Sequence[int]) -> List[int]:
    """Parents among the surviving nodes.

    Args:
        parent: original parent index of every node (-1 = root).
        alive: whether each node survives.
        replaced_by: for a removed node, the index of the node that replaced it (its NMS suppressor), else -1.

    Returns:
        For every node, the first surviving stand-in on its original ancestor chain (an ancestor itself, or the
        surviving replacement of a removed ancestor, unless that replacement is the node itself or one of its
        descendants), -1 when there is none. Entries of removed nodes are -1.
    """
    out = []
    for node in range(len(parent)):
        if not alive[node]:
            out.append(-1)
            continue
        found = -1
        p, seen = parent[node], set()
        while p != -1 and p not in seen:
            seen.add(p)
            if alive[p]:
                found = p
                break
            r = replaced_by[p]
            while r != -1 and not alive[r] and r not in seen:
                seen.add(r)
                r = replaced_by[r]
            if r != -1 and alive[r] and not _is_self_or_descendant(r, node, parent):
                found = r
                break
            p = parent[p]
        out.append(found)
    return out
