"""Multi-level ROIAlign pooler: level assignment and pooled values against hand-computed references."""
import math

import pytest
import torch

from cutler.modeling.poolers import ROIPooler, assign_boxes_to_levels, boxes_to_rois

SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def _square(x0, y0, side_w, side_h=None):
    side_h = side_w if side_h is None else side_h
    return [x0, y0, x0 + side_w, y0 + side_h]


def test_level_assignment_hand_computed():
    boxes = torch.tensor([
        _square(0, 0, 224),        # exactly canonical: floor(4 + log2(1)) = 4
        _square(0, 0, 223),        # just below: floor(4 + log2(0.9955)) = 3
        _square(0, 0, 112),        # 3
        _square(0, 0, 111.9),      # floor(4 + log2(0.4996)) = 2
        _square(0, 0, 448),        # 5
        _square(0, 0, 1000),       # floor(4 + log2(4.46)) = 6 -> clamped to 5
        _square(0, 0, 28),         # floor(4 - 3) = 1 -> clamped to 2
        _square(5, 5, 112, 448),   # sqrt(area) = 224 -> 4 (area, not the long side, decides)
        _square(3, 3, 0),          # zero area -> log2(1e-8) -> clamped to 2
    ], dtype=torch.float32)
    levels = assign_boxes_to_levels(boxes, min_level=2, max_level=5)
    assert levels.tolist() == [2, 1, 1, 0, 3, 3, 0, 2, 0]  # relative to level 2
    assert levels.dtype == torch.int64


def _linear_maps(batch=1, size=512, channels=2):
    """Level l (0-based) of image b: channel 0 = i + 10 j + 1000 l + 10000 b, channel 1 = -channel 0,
    with i the column and j the row of the feature cell."""
    feats = []
    for level, scale in enumerate(SCALES):
        n = int(size * scale)
        j, i = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")
        maps = []
        for b in range(batch):
            c0 = i + 10 * j + 1000 * level + 10000 * b
            maps.append(torch.stack([c0, -c0]))
        feats.append(torch.stack(maps))
    return feats


def _expected_linear(box, level, image, stride, out, aligned=True):
    """Bilinear interpolation is exact on a linear map and the samples of a bin are symmetric about
    its centre, so each bin averages to the map's value at the bin centre (in feature coordinates)."""
    off = 0.5 if aligned else 0.0
    u0, v0, u1, v1 = box[0] / stride - off, box[1] / stride - off, box[2] / stride - off, box[3] / stride - off
    cu = u0 + (torch.arange(out, dtype=torch.float64) + 0.5) * (u1 - u0) / out
    cv = v0 + (torch.arange(out, dtype=torch.float64) + 0.5) * (v1 - v0) / out
    return cu[None, :] + 10 * cv[:, None] + 1000 * level + 10000 * image


def test_roialign_v2_linear_map_values_and_levels():
    feats = _linear_maps(batch=2)
    pooler = ROIPooler(7, SCALES, sampling_ratio=0, pooler_type="ROIAlignV2")
    boxes_img0 = torch.tensor([[100.0, 60.0, 260.0, 220.0],   # 160 px -> level 3 (stride 8)
                               [40.0, 50.0, 80.0, 70.0]], dtype=torch.float64)  # ~28 px -> level 2 (stride 4)
    boxes_img1 = torch.tensor([[32.0, 32.0, 352.0, 352.0]], dtype=torch.float64)  # 320 px -> level 4 (stride 16)
    out = pooler(feats, [boxes_img0, boxes_img1])
    assert out.shape == (3, 2, 7, 7) and out.dtype == torch.float64
    expected = [
        _expected_linear(boxes_img0[0].tolist(), 1, 0, 8, 7),
        _expected_linear(boxes_img0[1].tolist(), 0, 0, 4, 7),
        _expected_linear(boxes_img1[0].tolist(), 2, 1, 16, 7),
    ]
    for r in range(3):
        torch.testing.assert_close(out[r, 0], expected[r], rtol=0, atol=1e-9)
        torch.testing.assert_close(out[r, 1], -expected[r], rtol=0, atol=1e-9)


def test_roialign_v2_hand_computed_numbers():
    # 160-px box at stride 8 starting at (100, 60): feature x from 100/8 - 0.5 = 12 to 260/8 - 0.5 = 32,
    # bin width 20/7, so bin 0 centre x = 12 + 10/7; rows from 7 to 27, bin 0 centre y = 7 + 10/7.
    feats = _linear_maps()
    out = ROIPooler(7, SCALES)(feats, [torch.tensor([[100.0, 60.0, 260.0, 220.0]], dtype=torch.float64)])
    assert out[0, 0, 0, 0].item() == pytest.approx((12 + 10 / 7) + 10 * (7 + 10 / 7) + 1000, abs=1e-9)


def test_legacy_roialign_is_half_a_cell_shifted():
    feats = _linear_maps()
    box = [100.0, 60.0, 260.0, 220.0]
    out = ROIPooler(7, SCALES, pooler_type="ROIAlign")(feats, [torch.tensor([box], dtype=torch.float64)])
    torch.testing.assert_close(out[0, 0], _expected_linear(box, 1, 0, 8, 7, aligned=False), rtol=0, atol=1e-9)


def test_constant_maps_and_input_order_across_levels():
    feats = [torch.full((2, 3, int(256 * s), int(256 * s)), float(10 * lvl)) for lvl, s in enumerate(SCALES)]
    feats = [f + torch.arange(2.0)[:, None, None, None] for f in feats]  # image b adds b
    boxes = [torch.tensor([[0.0, 0.0, 250.0, 250.0], [10.0, 10.0, 20.0, 20.0]]),
             torch.tensor([[5.0, 5.0, 130.0, 130.0]])]
    out = ROIPooler(5, SCALES)(feats, boxes)
    # 250 px -> level 4 (10 * 2), 10 px -> level 2 (0), 125 px -> level 3 (10) on image 1 (+1)
    for r, value in enumerate([20.0, 0.0, 11.0]):
        torch.testing.assert_close(out[r], torch.full((3, 5, 5), value))


def test_rois_input_and_empty():
    feats = _linear_maps()
    box = torch.tensor([[40.0, 50.0, 80.0, 70.0]], dtype=torch.float64)
    from_list = ROIPooler(7, SCALES)(feats, [box])
    from_rois = ROIPooler(7, SCALES)(feats, boxes_to_rois([box]))
    torch.testing.assert_close(from_list, from_rois)
    assert boxes_to_rois([box, box[:0], box]).tolist() == [[0, 40, 50, 80, 70], [2, 40, 50, 80, 70]]
    assert ROIPooler(7, SCALES)(feats, [box[:0]]).shape == (0, 2, 7, 7)


def test_half_features_pool_in_float32():
    feats = [f.float() for f in _linear_maps()]
    box = [torch.tensor([[100.0, 60.0, 260.0, 220.0]])]
    ref = ROIPooler(7, SCALES)(feats, box)
    half = ROIPooler(7, SCALES)([f.half() for f in feats], box)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), ref, rtol=2e-3, atol=0.5)  # fp16 holds ~1300 to 0.5


def test_rejects_non_pyramid_scales():
    with pytest.raises(ValueError):
        ROIPooler(7, [1 / 4, 1 / 16])
    with pytest.raises(ValueError):
        ROIPooler(7, SCALES, pooler_type="ROIPool")
    assert math.isclose(ROIPooler(7, SCALES).min_level, 2) and ROIPooler(7, SCALES).max_level == 5
