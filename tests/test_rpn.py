"""Anchors, box coding and RPN conventions pinned to hand-computed Detectron2 values."""
import math

import pytest
import torch

from cutler.config import load_config
from cutler.modeling.anchor_generator import DefaultAnchorGenerator, build_anchor_generator, generate_cell_anchors
from cutler.modeling.box_coding import Box2BoxTransform
from cutler.modeling.proposal_generator import build_rpn, find_top_rpn_proposals, flatten_predictions
from cutler.modeling.shape_spec import ShapeSpec

S2 = math.sqrt(2048.0) / 2  # 22.627417: half the long side of a 32-px anchor of ratio 0.5 or 2
S1 = math.sqrt(512.0) / 2  # 11.313708: half its short side
FPN_SHAPES = {f"p{k}": ShapeSpec(16, 2 ** k) for k in range(2, 7)}


def _cfg(*overrides):
    return load_config(None, list(overrides))


# --------------------------------------------------------------------------------------- anchors
def test_cell_anchors_sizes_outer_ratios_inner():
    cells = generate_cell_anchors([32, 64], [0.5, 1.0, 2.0])
    expected = torch.tensor([
        [-S2, -S1, S2, S1], [-16, -16, 16, 16], [-S1, -S2, S1, S2],
        [-2 * S2, -2 * S1, 2 * S2, 2 * S1], [-32, -32, 32, 32], [-2 * S1, -2 * S2, 2 * S1, 2 * S2]])
    torch.testing.assert_close(cells, expected)


def test_anchor_grid_first_anchors_and_counts_per_level():
    gen = build_anchor_generator(_cfg(), list(FPN_SHAPES.values()))
    # A 128 x 192 padded image: levels p2..p6 have 32x48, 16x24, 8x12, 4x6, 2x3 cells.
    feats = [torch.zeros(1, 16, 128 // s, 192 // s) for s in (4, 8, 16, 32, 64)]
    anchors = gen(feats)
    assert [a.shape[0] for a in anchors] == [32 * 48 * 3, 16 * 24 * 3, 8 * 12 * 3, 4 * 6 * 3, 2 * 3 * 3]
    p2, p3 = anchors[0], anchors[1]
    # offset 0.0: the first cell's anchors are centred at (0, 0); index = (row * W + col) * A + a.
    torch.testing.assert_close(p2[:3], torch.tensor([[-S2, -S1, S2, S1], [-16.0, -16, 16, 16], [-S1, -S2, S1, S2]]))
    torch.testing.assert_close(p2[3:6], p2[:3] + torch.tensor([4.0, 0, 4, 0]))  # next column, stride 4
    torch.testing.assert_close(p2[48 * 3], p2[0] + torch.tensor([0.0, 4, 0, 4]))  # next row
    torch.testing.assert_close(p2[(2 * 48 + 5) * 3 + 1], torch.tensor([20.0 - 16, 8 - 16, 20 + 16, 8 + 16]))
    torch.testing.assert_close(p3[:3], torch.tensor([[-2 * S2, -2 * S1, 2 * S2, 2 * S1], [-32.0, -32, 32, 32],
                                                     [-2 * S1, -2 * S2, 2 * S1, 2 * S2]]))
    torch.testing.assert_close(p3[3 + 1], torch.tensor([8.0 - 32, -32, 8 + 32, 32]))
    torch.testing.assert_close(anchors[4][1], torch.tensor([-256.0, -256, 256, 256]))


def test_anchor_offset_half_cell():
    gen = DefaultAnchorGenerator([[32]], [[1.0]], [8], offset=0.5)
    a = gen([torch.zeros(1, 1, 2, 2)])[0]
    torch.testing.assert_close(a, torch.tensor([[-12.0, -12, 20, 20], [-4, -12, 28, 20], [-12, -4, 20, 28],
                                                [-4, -4, 28, 28]]))
    with pytest.raises(ValueError, match="offset"):
        DefaultAnchorGenerator([[32]], [[1.0]], [8], offset=1.0)


def test_anchor_buffers_are_not_checkpoint_keys():
    gen = build_anchor_generator(_cfg(), list(FPN_SHAPES.values()))
    assert gen.state_dict() == {} and gen.num_anchors == [3] * 5


# ------------------------------------------------------------------------------------ box coding
def test_box_coding_hand_values_and_round_trip():
    src = torch.tensor([[0.0, 0, 10, 10], [10, 20, 30, 60]])
    tgt = torch.tensor([[0.0, 0, 20, 10], [15, 10, 55, 50]])
    t1 = Box2BoxTransform((1, 1, 1, 1))
    d1 = t1.get_deltas(src, tgt)
    torch.testing.assert_close(d1, torch.tensor([[0.5, 0, math.log(2), 0], [0.75, -0.25, math.log(2), 0]]))
    t2 = Box2BoxTransform((10, 10, 5, 5))
    d2 = t2.get_deltas(src, tgt)
    torch.testing.assert_close(d2, d1 * torch.tensor([10.0, 10, 5, 5]))
    torch.testing.assert_close(t2.apply_deltas(d2, src), tgt)
    # (N, 4k) class-specific deltas decode class by class.
    both = t1.apply_deltas(torch.cat([d1, torch.zeros_like(d1)], dim=1), src)
    torch.testing.assert_close(both, torch.cat([tgt, src], dim=1))


def test_box_coding_clamps_log_scale():
    t = Box2BoxTransform((1, 1, 1, 1))
    out = t.apply_deltas(torch.tensor([[0.0, 0, 10, 0]]), torch.tensor([[0.0, 0, 10, 10]]))
    width = 10 * 1000 / 16  # exp(log(1000/16)) * 10
    torch.testing.assert_close(out, torch.tensor([[5 - width / 2, 0, 5 + width / 2, 10]]))


# ------------------------------------------------------------------------------------ RPN pieces
def test_flatten_predictions_layout():
    logits = torch.tensor([0.0, 1, 2]).view(1, 3, 1, 1).expand(2, 3, 2, 3)
    deltas = torch.arange(12.0).view(1, 12, 1, 1).expand(2, 12, 2, 3)
    (fl,), (fd,) = flatten_predictions([logits], [deltas])
    assert fl.shape == (2, 18) and fd.shape == (2, 18, 4)
    torch.testing.assert_close(fl[0], torch.tensor([0.0, 1, 2] * 6))
    torch.testing.assert_close(fd[1, 4], torch.tensor([4.0, 5, 6, 7]))  # location 1, anchor 1: channels 4..7
    t = torch.zeros(1, 3, 2, 3)
    t[0, 2, 1, 0] = 9.0  # anchor 2 at row 1, column 0 -> index (1 * 3 + 0) * 3 + 2 = 11
    assert flatten_predictions([t], [torch.zeros(1, 12, 2, 3)])[0][0][0].argmax().item() == 11


def _rpn(*overrides):
    return build_rpn(_cfg(*overrides), FPN_SHAPES)


def test_rpn_state_dict_keys():
    keys = {"proposal_generator." + k for k in _rpn().state_dict()}
    assert keys == {f"proposal_generator.rpn_head.{m}.{p}" for m in ("conv", "objectness_logits", "anchor_deltas")
                    for p in ("weight", "bias")}
    sd = _rpn().state_dict()
    assert tuple(sd["rpn_head.objectness_logits.weight"].shape) == (3, 16, 1, 1)
    assert tuple(sd["rpn_head.anchor_deltas.weight"].shape) == (12, 16, 1, 1)


def test_label_and_sample_anchors_bands_and_low_quality_matches():
    rpn = _rpn()
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 12], [0, 0, 10, 20], [20, 20, 30, 30],
                            [100, 100, 120, 120]])
    gt = torch.tensor([[0.0, 0, 10, 10], [100, 100, 110, 110]])
    labels, matched = rpn.label_and_sample_anchors(anchors, [gt, torch.zeros(0, 4)])
    # IoUs with gt0: 1, 0.833 (fg), 0.5 (ignored), 0 (bg); a4's IoU with gt1 is 0.25 < 0.3 but it is
    # gt1's best anchor, so the low-quality rule makes it foreground.
    assert labels[0].tolist() == [1, 1, -1, 0, 1]
    torch.testing.assert_close(matched[0, 4], gt[1])
    torch.testing.assert_close(matched[0, 1], gt[0])
    assert labels[1].tolist() == [0] * 5  # no ground truth: every anchor is background
    assert torch.equal(matched[1], torch.zeros(5, 4))


def test_anchor_sampling_respects_batch_size_and_fraction():
    rpn = _rpn("model.rpn.batch_size_per_image=4", "model.rpn.positive_fraction=0.25")
    anchors = torch.tensor([[0.0, 0, 10, 10]] * 6 + [[50.0, 50, 60, 60]] * 6)
    torch.manual_seed(0)
    labels, _ = rpn.label_and_sample_anchors(anchors, [torch.tensor([[0.0, 0, 10, 10]])])
    assert (labels == 1).sum() == 1 and (labels == 0).sum() == 3 and (labels == -1).sum() == 8


def test_rpn_losses_are_sums_over_batch_size_per_image_times_images():
    rpn = _rpn()  # batch_size_per_image 256, 2 images -> normaliser 512
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 20, 20], [5, 5, 15, 15]])
    labels = torch.tensor([[1, 0, -1], [-1, 0, 1]], dtype=torch.int8)
    logits = torch.tensor([[0.0, 0.0, 7.0], [3.0, 1.0, 0.0]])  # 7.0 and 3.0 sit on ignored anchors
    deltas = torch.zeros(2, 3, 4)
    deltas[0, 1] = 5.0  # background anchor: no box loss
    deltas[1, 2] = torch.tensor([0.1, -0.2, 0.0, 0.3])
    gt = torch.zeros(2, 3, 4)
    gt[0, 0] = torch.tensor([0.0, 0, 20, 10])  # target deltas (0.5, 0, log 2, 0)
    gt[1, 2] = anchors[2]  # target deltas 0
    losses = rpn.losses(anchors, logits, deltas, labels, gt)
    expected_cls = (3 * math.log(2) + math.log(1 + math.e)) / 512
    expected_loc = (0.5 + math.log(2) + 0.6) / 512
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"}
    assert losses["loss_rpn_cls"].item() == pytest.approx(expected_cls, rel=1e-6)
    assert losses["loss_rpn_loc"].item() == pytest.approx(expected_loc, rel=1e-6)
    weighted = _rpn("model.rpn.loss_weight=2.0", "model.rpn.bbox_reg_loss_weight=0.5").losses(
        anchors, logits, deltas, labels, gt)
    assert weighted["loss_rpn_cls"].item() == pytest.approx(2 * expected_cls, rel=1e-6)
    assert weighted["loss_rpn_loc"].item() == pytest.approx(expected_loc, rel=1e-6)


def test_find_top_proposals_topk_per_level_nms_per_level_and_post_topk():
    b = [[0.0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]]
    c = [[0.0, 0, 10, 10], [90, 90, 120, 120], [200, 200, 250, 250]]
    level0 = torch.tensor([b, b])
    level1 = torch.tensor([c, c])
    scores0 = torch.tensor([[4.0, 3, 2, 5], [1, 2, 3, 0]])
    scores1 = torch.tensor([[1.0, 6, 7], [0.5, -1, -2]])
    res = find_top_rpn_proposals([level0, level1], [scores0, scores1], [(100, 100), (100, 100)], nms_thresh=0.7,
                                 pre_nms_topk=3, post_nms_topk=3, min_box_size=0.0, training=False)
    # Image 0: level 0 keeps the top 3 (5, 4, 3: b2 is cut before NMS), NMS drops b1 (duplicate of b0
    # in the SAME level); c0 duplicates b0 in another level and survives; c2 is empty after clipping.
    torch.testing.assert_close(res[0]["boxes"], torch.tensor([[90.0, 90, 100, 100], [20, 20, 30, 30], [0, 0, 10, 10]]))
    torch.testing.assert_close(res[0]["objectness_logits"], torch.tensor([6.0, 5, 4]))
    # Image 1 (same boxes, other scores): top 3 of level 0 = b2, b1, b0; NMS keeps b1 over b0.
    torch.testing.assert_close(res[1]["boxes"], torch.tensor([[50.0, 50, 60, 60], [0, 0, 10, 10], [0, 0, 10, 10]]))
    torch.testing.assert_close(res[1]["objectness_logits"], torch.tensor([3.0, 2, 0.5]))


def test_find_top_proposals_non_finite():
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, float("nan"), 5]]])
    scores = torch.tensor([[1.0, 2.0]])
    with pytest.raises(FloatingPointError):
        find_top_rpn_proposals([boxes], [scores], [(20, 20)], 0.7, 10, 10, 0.0, training=True)
    res = find_top_rpn_proposals([boxes], [scores], [(20, 20)], 0.7, 10, 10, 0.0, training=False)
    torch.testing.assert_close(res[0]["boxes"], torch.tensor([[0.0, 0, 10, 10]]))


def test_rpn_forward_train_and_eval_shapes():
    torch.manual_seed(0)
    rpn = _rpn("model.rpn.post_nms_topk_test=50", "model.rpn.pre_nms_topk_test=30")
    feats = {f"p{k}": torch.randn(2, 16, 128 // 2 ** k, 160 // 2 ** k) for k in range(2, 7)}
    sizes = [(120, 150), (128, 160)]
    rpn.train()
    proposals, losses = rpn(feats, sizes, [torch.tensor([[10.0, 10, 60, 80]]), torch.zeros(0, 4)])
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"} and all(v.dim() == 0 for v in losses.values())
    (losses["loss_rpn_cls"] + losses["loss_rpn_loc"]).backward()
    assert rpn.rpn_head.conv.weight.grad is not None
    assert not proposals[0]["boxes"].requires_grad
    rpn.eval()
    with torch.no_grad():
        proposals, losses = rpn(feats, sizes)
    assert losses == {}
    for p, (h, w) in zip(proposals, sizes):
        assert 0 < p["boxes"].shape[0] <= 50 and p["objectness_logits"].shape == p["boxes"].shape[:1]
        assert (p["boxes"][:, 0::2] <= w).all() and (p["boxes"][:, 1::2] <= h).all() and (p["boxes"] >= 0).all()
        assert (p["objectness_logits"][:-1] >= p["objectness_logits"][1:]).all()
    # pre_nms_topk_test=30 per level over 5 levels bounds the candidates before NMS.
    assert max(p["boxes"].shape[0] for p in proposals) <= 5 * 30
