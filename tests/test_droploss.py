"""DropLoss: weights from predicted boxes vs each image's true GT, and the weighted cross-entropy."""
import math

import pytest
import torch

from cutler.modeling.droploss import droploss_cross_entropy, droploss_weights, max_iou_with_gt


def _gt():
    return [torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
            torch.tensor([[100.0, 100.0, 120.0, 120.0], [0.0, 0.0, 4.0, 4.0]]),
            torch.zeros((0, 4))]


def test_max_iou_uses_only_own_image_gt():
    boxes = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],      # img 0: identical -> 1
        [5.0, 0.0, 15.0, 10.0],      # img 0: inter 50 / union 150 -> 1/3
        [100.0, 100.0, 120.0, 120.0],  # img 0: matches image 1's GT only -> 0 (no cross-image)
        [0.0, 0.0, 10.0, 10.0],      # img 1: best is [0,0,4,4]: 16 / 100 -> 0.16
        [110.0, 100.0, 130.0, 120.0],  # img 1: 200 / 600 -> 1/3
        [0.0, 0.0, 10.0, 10.0],      # img 2: no GT -> -1
    ])
    image = torch.tensor([0, 0, 0, 1, 1, 2])
    iou = max_iou_with_gt(boxes, image, _gt())
    torch.testing.assert_close(iou, torch.tensor([1.0, 1 / 3, 0.0, 0.16, 1 / 3, -1.0]))


def test_weights_threshold_boundary_and_images_without_gt():
    gt = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.zeros((0, 4))]
    boxes = torch.tensor([
        [0.0, 0.0, 5.0, 5.0],    # IoU 25 / 100 = 0.25 exactly: "<= tau" -> dropped
        [0.0, 0.0, 5.0, 6.0],    # 0.30 -> kept
        [20.0, 20.0, 30.0, 30.0],  # 0 -> dropped
        [20.0, 20.0, 30.0, 30.0],  # image without GT -> plain loss
    ])
    w = droploss_weights(boxes, torch.tensor([0, 0, 0, 1]), gt, iou_thresh=0.25)
    assert w.tolist() == [0.0, 1.0, 0.0, 1.0] and w.dtype == torch.float32
    # CutLER's tau = 0.01: any real overlap keeps the loss, only disjoint boxes are dropped.
    w = droploss_weights(boxes, torch.tensor([0, 0, 0, 1]), gt, iou_thresh=0.01)
    assert w.tolist() == [1.0, 1.0, 0.0, 1.0]
    # IoU exactly 0.01 (1 px box inside a 100 px GT) is dropped at tau = 0.01.
    w = droploss_weights(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([0]), gt, iou_thresh=0.01)
    assert w.tolist() == [0.0]


def test_weights_without_any_gt_or_boxes():
    assert droploss_weights(torch.zeros((0, 4)), torch.zeros(0, dtype=torch.long), _gt(), 0.01).shape == (0,)
    w = droploss_weights(torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), torch.tensor([0, 1]), [torch.zeros((0, 4))] * 2, 0.5)
    assert w.tolist() == [1.0, 1.0]


def test_weighted_cross_entropy_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [math.log(3.0), 0.0], [5.0, -5.0]], requires_grad=True)
    classes = torch.tensor([0, 0, 1, 1])
    weights = torch.tensor([1.0, 1.0, 1.0, 0.0])
    # CE: ln 2, -ln(3/4), -ln(1/4), (dropped); the denominator is all 4 proposals.
    expected = (math.log(2.0) + math.log(4 / 3) + math.log(4.0)) / 4
    loss = droploss_cross_entropy(logits, classes, weights)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[3] == 0) and torch.any(logits.grad[0] != 0)
    plain = droploss_cross_entropy(logits, classes, torch.ones(4))
    assert plain.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, classes).item(), rel=1e-6)


def test_weighted_cross_entropy_is_float32_and_empty_safe():
    logits = torch.zeros(3, 2, dtype=torch.float16)
    loss = droploss_cross_entropy(logits, torch.tensor([0, 1, 1]), torch.tensor([1.0, 0.0, 1.0]))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(2 * math.log(2.0) / 3, rel=1e-6)
    empty = torch.zeros(0, 2, requires_grad=True)
    out = droploss_cross_entropy(empty, torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert out.item() == 0.0 and out.requires_grad


def test_many_boxes_are_chunked_consistently():
    torch.manual_seed(0)
    xy = torch.rand(5000, 2) * 90
    boxes = torch.cat([xy, xy + torch.rand(5000, 2) * 20 + 1], dim=1)
    image = torch.randint(0, 3, (5000,))
    gt = _gt()
    iou = max_iou_with_gt(boxes, image, gt)
    from cutler.structures.boxes import pairwise_iou

    for i, g in enumerate(gt):
        sel = image == i
        ref = pairwise_iou(boxes[sel], g).max(dim=1).values if len(g) else torch.full((int(sel.sum()),), -1.0)
        torch.testing.assert_close(iou[sel], ref)
