"""Boxes, masks and their encodings (cutler.structures) against independent references."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from torchvision.ops import box_iou

from cutler.structures import (encode_masks, mask_iou, masks_to_boxes, pairwise_iou, rle_area, rle_iou, rle_to_bbox,
                               rle_to_json, segmentation_to_rle, xywh_to_xyxy)


def _random_masks(n: int, h: int = 13, w: int = 17, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = rng.random((n, h, w)) < rng.uniform(0.1, 0.6, (n, 1, 1))
    masks[0] = False  # an empty mask among them
    return masks


def test_pairwise_iou_matches_torchvision_and_degenerate_boxes_give_zero():
    rng = np.random.default_rng(1)
    a = torch.tensor(np.concatenate([rng.uniform(0, 50, (7, 2)), rng.uniform(0, 40, (7, 2))], 1))
    b = torch.tensor(np.concatenate([rng.uniform(0, 50, (5, 2)), rng.uniform(0, 40, (5, 2))], 1))
    assert torch.equal(xywh_to_xyxy(a)[:, 2:], a[:, :2] + a[:, 2:])
    a, b = xywh_to_xyxy(a), xywh_to_xyxy(b)
    torch.testing.assert_close(pairwise_iou(a, b), box_iou(a, b), rtol=1e-10, atol=1e-12)
    zero = torch.zeros((1, 4), dtype=torch.float64)
    assert pairwise_iou(zero, zero).item() == 0.0  # no NaN


def test_mask_iou_counts_pixels_and_names_the_empty_case():
    a, b = torch.from_numpy(_random_masks(6, seed=2)), torch.from_numpy(_random_masks(6, seed=3))
    inter = (a.numpy() & b.numpy()).sum((1, 2))
    union = (a.numpy() | b.numpy()).sum((1, 2))
    got = mask_iou(a.flatten(1), b.flatten(1))
    assert got.dtype == torch.float64
    np.testing.assert_array_equal(got[1:].numpy(), inter[1:] / union[1:])
    empty = torch.zeros(5, dtype=torch.bool)
    assert mask_iou(empty, empty).item() == 0.0 and mask_iou(empty, empty, empty=1.0).item() == 1.0
    # leading dims are batch dims: (B, N, P) -> (B, N)
    assert mask_iou(a.flatten(1).view(2, 3, -1), b.flatten(1).view(2, 3, -1)).shape == (2, 3)


def test_masks_to_boxes_are_pixel_edges():
    m = torch.zeros((2, 6, 8), dtype=torch.bool)
    m[1, 2:4, 3] = True
    assert masks_to_boxes(m).tolist() == [[0, 0, 0, 0], [3, 2, 4, 4]]


def test_every_segmentation_form_gives_the_same_compressed_rle():
    h, w = 20, 24
    polygon = [[2.0, 3.0, 15.0, 3.0, 15.0, 12.0, 2.0, 12.0]]
    dense = mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygon, h, w)))
    compressed = mask_util.encode(np.asfortranarray(dense))
    runs, flat, value = [], dense.flatten(order="F"), 0
    for start in range(len(flat) + 1):  # uncompressed RLE: run lengths of 0s and 1s, column-major
        if start == len(flat) or flat[start] != value:
            runs.append(start - sum(runs))
            value = 1 - value
    forms = {"polygon": polygon, "uncompressed": {"size": [h, w], "counts": runs},
             "str": {"size": [h, w], "counts": compressed["counts"].decode("ascii")}, "bytes": compressed}
    for name, seg in forms.items():
        rle = segmentation_to_rle(seg, h, w)
        assert isinstance(rle["counts"], bytes), name
        np.testing.assert_array_equal(mask_util.decode(rle), dense, err_msg=name)
    with pytest.raises(ValueError, match="int"):
        segmentation_to_rle(3, h, w)


def test_encoded_masks_round_trip_with_area_box_and_iou():
    masks = _random_masks(5, seed=4)
    rles = encode_masks(masks)
    assert encode_masks(np.zeros((0, 4, 4), bool)) == []
    assert all(isinstance(r["counts"], str) and r["size"] == [13, 17] for r in rles)
    for m, r in zip(masks, rles):
        np.testing.assert_array_equal(mask_util.decode(r).astype(bool), m)
        assert rle_area(r) == m.sum() and rle_to_json(segmentation_to_rle(r, 13, 17)) == r
        ys, xs = np.nonzero(m)
        assert rle_to_bbox(r) == ([float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]
                                  if m.any() else [0.0, 0.0, 0.0, 0.0])
    dense = torch.from_numpy(masks).flatten(1)
    ious = rle_iou(rles, rles[1:])
    assert ious.shape == (5, 4) and rle_iou(rles, []).shape == (5, 0)
    np.testing.assert_allclose(ious, mask_iou(dense[:, None], dense[None, 1:]).numpy(), rtol=1e-12, atol=0)
