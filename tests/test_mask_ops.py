"""Mask pasting (Detectron2 arithmetic), mask-head targets and mask loss, with hand-checked pixels."""
import pytest
import torch
from torch.nn import functional as F

from cutler.modeling.roi_heads import paste_masks_in_image
from cutler.modeling.roi_heads.mask_head import (MaskRCNNConvUpsampleHead, crop_and_resize_masks, mask_rcnn_inference,
                                                 mask_rcnn_loss)


def _reference_paste(mask_probs, boxes, hw, threshold=0.5):
    """Detectron2's formula on the whole image, one mask at a time, no cropping."""
    h, w = hw
    out = []
    for m, b in zip(mask_probs, boxes):
        x0, y0, x1, y1 = b.tolist()
        xs = (torch.arange(w, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
        ys = (torch.arange(h, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
        grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=2)[None]
        out.append(F.grid_sample(m[None, None].float(), grid, align_corners=False)[0, 0] >= threshold)
    return torch.stack(out)


def test_one_pixel_per_cell_copies_the_mask():
    # A 28x28 box at integer corners: pixel centre x + 0.5 lands on mask cell centre x - x0 exactly.
    torch.manual_seed(0)
    mask = torch.rand(28, 28)
    out = paste_masks_in_image(mask[None], torch.tensor([[10.0, 20.0, 38.0, 48.0]]), (64, 60))
    assert out.shape == (1, 64, 60) and out.dtype == torch.bool
    expected = torch.zeros(64, 60, dtype=torch.bool)
    expected[20:48, 10:38] = mask >= 0.5
    assert torch.equal(out[0], expected)


def test_upsampling_by_two_hand_checked_columns():
    # 0.6 on the left 14 columns. Box of 56 px: pixel column c (relative) samples the mask at
    # u = c / 2 - 0.25, e.g. c = 0 -> 0.75 * 0.6 + 0.25 * 0 (zero padding) = 0.45 < 0.5 (off),
    # c = 1 -> 0.6 (on), c = 26 -> u = 12.75 -> 0.6 (on), c = 27 -> 0.75 * 0.6 + 0.25 * 0 = 0.45 (off).
    mask = torch.zeros(28, 28)
    mask[:, :14] = 0.6
    out = paste_masks_in_image(mask[None], torch.tensor([[4.0, 4.0, 60.0, 60.0]]), (64, 64))[0]
    row = out[30, 4:60]
    assert row[1:27].all() and not row[0] and not row[27:].any()
    assert not out[:, :4].any() and not out[:, 60:].any()
    # Rows: mask constant vertically, but the first/last rows blend with the zero padding the same way.
    col = out[4:60, 10]
    assert col[1:55].all() and not col[0] and not col[55]
    assert torch.equal(out, _reference_paste(mask[None], torch.tensor([[4.0, 4.0, 60.0, 60.0]]), (64, 64))[0])


def test_boxes_partly_outside_the_image():
    ones = torch.ones(2, 28, 28)
    boxes = torch.tensor([[-14.0, -14.0, 14.0, 14.0], [10.0, 6.0, 38.0, 34.0]])
    out = paste_masks_in_image(ones, boxes, (20, 20))
    expected0 = torch.zeros(20, 20, dtype=torch.bool)
    expected0[:14, :14] = True
    expected1 = torch.zeros(20, 20, dtype=torch.bool)
    expected1[6:, 10:] = True
    assert torch.equal(out[0], expected0) and torch.equal(out[1], expected1)


def test_matches_full_image_reference_with_small_chunks():
    torch.manual_seed(1)
    n, hw = 9, (37, 53)
    probs = torch.rand(n, 28, 28)
    xy = torch.rand(n, 2) * torch.tensor([60.0, 45.0]) - 5
    wh = torch.rand(n, 2) * 40 + 0.5
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[0] = torch.tensor([-300.0, -200.0, 400.0, 300.0])  # far larger than the image
    expected = _reference_paste(probs, boxes, hw)
    for budget in (1, 37 * 53 * 16 * 4, 1 << 28):  # one mask per chunk, 4 per chunk, all at once
        assert torch.equal(paste_masks_in_image(probs, boxes, hw, max_chunk_bytes=budget), expected)
    for threshold in (0.2, 0.9):
        assert torch.equal(paste_masks_in_image(probs, boxes, hw, threshold), _reference_paste(probs, boxes, hw, threshold))


def test_empty_inputs_and_degenerate_boxes():
    assert paste_masks_in_image(torch.zeros(0, 28, 28), torch.zeros(0, 4), (5, 7)).shape == (0, 5, 7)
    out = paste_masks_in_image(torch.ones(2, 28, 28), torch.tensor([[3.0, 3.0, 3.0, 9.0], [2.0, 5.0, 8.0, 5.0]]), (10, 10))
    assert not out.any()
    with pytest.raises(ValueError):
        paste_masks_in_image(torch.ones(1, 28, 28), torch.tensor([[0.0, 0.0, 5.0, 5.0]]), (10, 10), threshold=0.0)


def test_crop_and_resize_targets():
    # GT mask: left half of a 40x40 image. A box covering x in [10, 30]: in 4x4 output cells of 5 px,
    # columns 0-1 lie in x < 20 (on), columns 2-3 in x >= 20 (off).
    masks = torch.zeros(2, 40, 40, dtype=torch.bool)
    masks[0, :, :20] = True
    masks[1, 5:15, 5:15] = True
    boxes = torch.tensor([[10.0, 0.0, 30.0, 20.0], [5.0, 5.0, 15.0, 15.0], [0.0, 0.0, 10.0, 10.0]])
    out = crop_and_resize_masks(masks, torch.tensor([0, 1, 1]), boxes, 4)
    assert out.dtype == torch.bool and out.shape == (3, 4, 4)
    assert out[0, :, :2].all() and not out[0, :, 2:].any()
    assert out[1].all()
    # [0, 10]^2 on mask 1 (on in [5, 15)^2): cells of 2.5 px, cells 0-1 cover [0, 5) (off), 2-3 on.
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[2:, 2:] = True
    assert torch.equal(out[2], expected)
    assert crop_and_resize_masks(masks, torch.zeros(0, dtype=torch.long), torch.zeros(0, 4), 28).shape == (0, 28, 28)


def test_mask_loss_selects_gt_class_and_inference_selects_predicted_class():
    logits = torch.zeros(2, 3, 2, 2)
    logits[0, 1] = 2.0   # class 1 of row 0
    logits[1, 2] = -1.0  # class 2 of row 1
    targets = torch.tensor([[[1, 1], [1, 1]], [[0, 0], [0, 0]]], dtype=torch.bool)
    loss = mask_rcnn_loss(logits, torch.tensor([1, 2]), targets)
    expected = (torch.log1p(torch.exp(torch.tensor(-2.0))) + torch.log1p(torch.exp(torch.tensor(-1.0)))) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    probs = mask_rcnn_inference(logits, torch.tensor([1, 0]))
    torch.testing.assert_close(probs, torch.stack([torch.full((2, 2), torch.sigmoid(torch.tensor(2.0)).item()),
                                                   torch.full((2, 2), 0.5)]))
    agnostic = mask_rcnn_loss(logits[:, 1:2], torch.tensor([0, 0]), targets)
    assert agnostic.item() == pytest.approx(((torch.log1p(torch.exp(torch.tensor(-2.0))) + torch.log(torch.tensor(2.0))) / 2).item(), rel=1e-6)
    empty = mask_rcnn_loss(logits[:0], torch.zeros(0, dtype=torch.long), targets[:0])
    assert empty.item() == 0.0


def test_mask_head_shapes_and_keys():
    head = MaskRCNNConvUpsampleHead(8, num_classes=1, conv_dim=16, num_conv=4)
    assert head(torch.randn(3, 8, 14, 14)).shape == (3, 1, 28, 28)
    keys = set(head.state_dict())
    assert {f"mask_fcn{i}.weight" for i in range(1, 5)} | {"deconv.weight", "predictor.weight"} <= keys
    assert MaskRCNNConvUpsampleHead(8, 5, 16, 2, cls_agnostic_mask=True)(torch.randn(1, 8, 14, 14)).shape == (1, 1, 28, 28)
