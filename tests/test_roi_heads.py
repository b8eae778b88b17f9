"""ROI heads: checkpoint keys, hand-computed losses (incl. DropLoss in the heads), cascade score
averaging with mocked stages, per-image inference, and a small over-fitting run."""
import math

import pytest
import torch

from cutler.config import load_config
from cutler.modeling.box_coding import Box2BoxTransform
from cutler.structures.boxes import pairwise_iou
from cutler.modeling.roi_heads import CascadeROIHeads, StandardROIHeads, build_roi_heads, paste_masks_in_image
from cutler.modeling.roi_heads.base import ProposalBatch, scale_gradient
from cutler.modeling.roi_heads.fast_rcnn import fast_rcnn_inference_single_image
from cutler.modeling.shape_spec import ShapeSpec

BASE = ["model.roi_heads.num_classes=1", "model.roi_box_head.num_fc=2", "model.roi_box_head.pooler_resolution=7",
        "model.roi_mask_head.num_conv=4", "model.roi_box_head.cls_agnostic_bbox_reg=true"]


def _cfg(name="CascadeROIHeads", *extra):
    return load_config(None, BASE + [f"model.roi_heads.name={name}"] + list(extra))


def _shapes(channels=8):
    return {f"p{i}": ShapeSpec(channels=channels, stride=2 ** i) for i in range(2, 6)}


def _features(batch=2, size=64, channels=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(batch, channels, size // 2 ** i, size // 2 ** i, generator=g) for i in range(2, 6)}


def _small(*extra):
    return ["model.roi_box_head.fc_dim=32", "model.roi_mask_head.conv_dim=8"] + list(extra)


# ------------------------------------------------------------------------------------------ structure
def test_cascade_checkpoint_keys():
    heads = build_roi_heads(_cfg("CascadeROIHeads", "model.mask_on=true"), _shapes(256))
    assert isinstance(heads, CascadeROIHeads)
    keys = set(heads.state_dict())
    expected = set()
    for k in range(3):
        for p in ("weight", "bias"):
            expected |= {f"box_head.{k}.fc1.{p}", f"box_head.{k}.fc2.{p}",
                         f"box_predictor.{k}.cls_score.{p}", f"box_predictor.{k}.bbox_pred.{p}"}
    for p in ("weight", "bias"):
        expected |= {f"mask_head.mask_fcn{i}.{p}" for i in range(1, 5)}
        expected |= {f"mask_head.deconv.{p}", f"mask_head.predictor.{p}"}
    assert keys == expected
    sd = heads.state_dict()
    assert sd["box_head.0.fc1.weight"].shape == (1024, 256 * 7 * 7)
    assert sd["box_predictor.2.cls_score.weight"].shape == (2, 1024)
    assert sd["box_predictor.2.bbox_pred.weight"].shape == (4, 1024)
    assert sd["mask_head.deconv.weight"].shape == (256, 256, 2, 2)
    assert sd["mask_head.predictor.weight"].shape == (1, 256, 1, 1)


def test_standard_checkpoint_keys_and_aliases():
    heads = build_roi_heads(_cfg("CustomStandardROIHeads", "model.roi_heads.num_classes=3",
                                 "model.roi_box_head.cls_agnostic_bbox_reg=false"), _shapes(16))
    assert isinstance(heads, StandardROIHeads)
    keys = set(heads.state_dict())
    assert keys == {f"{m}.{p}" for m in ("box_head.fc1", "box_head.fc2", "box_predictor.cls_score",
                                          "box_predictor.bbox_pred") for p in ("weight", "bias")}
    assert heads.state_dict()["box_predictor.bbox_pred.weight"].shape == (12, 1024)  # 4 K deltas
    assert isinstance(build_roi_heads(_cfg("CustomCascadeROIHeads"), _shapes()), CascadeROIHeads)
    with pytest.raises(ValueError):
        build_roi_heads(_cfg("RROIHeads"), _shapes())
    with pytest.raises(ValueError):  # Detectron2's cascade requires class-agnostic regression
        build_roi_heads(_cfg("CascadeROIHeads", "model.roi_box_head.cls_agnostic_bbox_reg=false"), _shapes())
    with pytest.raises(ValueError):  # stage 1 is labelled with roi_heads.iou_thresholds: they must agree
        build_roi_heads(_cfg("CascadeROIHeads", "model.roi_heads.iou_thresholds=[0.6]"), _shapes())
    with pytest.raises(ValueError):  # options we do not implement are refused, not ignored
        build_roi_heads(_cfg("StandardROIHeads", "model.roi_box_head.use_sigmoid_ce=true"), _shapes())


def test_scale_gradient():
    x = torch.ones(3, requires_grad=True)
    y = scale_gradient(x, 1 / 3)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([3.0, 6.0, 9.0])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 2.0, 3.0]))


# --------------------------------------------------------------------------- hand-computed training
IMG0_PROPOSALS = torch.tensor([
    [0.0, 0.0, 10.0, 10.0],    # A: IoU 1 with the GT
    [0.0, 0.0, 10.0, 20.0],    # B: IoU 0.5 (fg at 0.5, bg at 0.6 / 0.7)
    [8.0, 0.0, 18.0, 10.0],    # C: IoU 20 / 180: background, but overlaps -> kept by DropLoss
    [50.0, 50.0, 60.0, 60.0],  # D: IoU 0 -> dropped by DropLoss
])
IMG1_PROPOSALS = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])  # image without GT


def _targets(with_masks=False):
    t0 = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "classes": torch.tensor([0])}
    t1 = {"boxes": torch.zeros((0, 4)), "classes": torch.zeros(0, dtype=torch.int64)}
    if with_masks:
        m0 = torch.zeros(1, 64, 64, dtype=torch.bool)
        m0[0, :10, :10] = True
        t0["masks"], t1["masks"] = m0, torch.zeros(0, 64, 64, dtype=torch.bool)
    return [t0, t1]


def _constant_outputs(heads, cls_bias, box_bias, mask_bias=None):
    """Zero every weight so each predictor outputs its biases whatever the features."""
    with torch.no_grad():
        for p in heads.parameters():
            p.zero_()
        predictors = heads.box_predictor if isinstance(heads.box_predictor, torch.nn.ModuleList) else [heads.box_predictor]
        for pred, cb, bb in zip(predictors, cls_bias, box_bias):
            pred.cls_score.bias.copy_(torch.tensor(cb))
            pred.bbox_pred.bias.copy_(torch.tensor(bb))
        if mask_bias is not None:
            heads.mask_head.predictor.bias.fill_(mask_bias)


def _softplus(x):
    return math.log1p(math.exp(x))


@pytest.mark.parametrize("use_droploss", [True, False])
def test_standard_losses_hand_computed(use_droploss):
    cfg = _cfg("StandardROIHeads", "model.mask_on=true", f"model.roi_heads.use_droploss={use_droploss}",
               "model.roi_heads.droploss_iou_thresh=0.01", *_small())
    heads = build_roi_heads(cfg, _shapes()).train()
    a, b = 0.5, 1.5
    _constant_outputs(heads, [[a, 0.0]], [[0.0, 0.0, 0.0, 0.0]], mask_bias=b)
    _, losses = heads(_features(), [IMG0_PROPOSALS, IMG1_PROPOSALS], [(64, 64), (64, 64)], _targets(True))
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask"}
    ce_fg, ce_bg = _softplus(-a), _softplus(a)
    # 7 sampled rows: A, B, appended GT (fg); C, D (bg, image 0); two bg rows of image 1.
    # DropLoss drops D only (predicted box = proposal here; image 1 has no GT -> plain loss).
    n_bg = 3 if use_droploss else 4
    assert losses["loss_cls"].item() == pytest.approx((3 * ce_fg + n_bg * ce_bg) / 7, rel=1e-5)
    # Only B regresses (zero deltas vs target dy = 10 * (5 - 10) / 20, dh = 5 * ln(10 / 20)), L1 / 7.
    assert losses["loss_box_reg"].item() == pytest.approx((2.5 + 5 * math.log(2.0)) / 7, rel=1e-5)
    # Mask targets (28 x 28) on the 3 fg proposals only. A and the GT box equal the mask's box: every
    # cell is on except the bottom-right one, sampled at pixel coordinate (9.32, 9.32) between pixel 9
    # (on) and 10 (off): 0.68 * 0.68 = 0.46 < 0.5 -> 783 on. B (twice as tall): rows 0-13 on (row 13
    # samples y = 9.14 -> 0.86; row 14 y = 9.86 -> 0.14), and its corner 0.857 * 0.68 >= 0.5 -> 392 on.
    frac_on = (783 + 783 + 392) / (3 * 784)
    assert losses["loss_mask"].item() == pytest.approx(frac_on * _softplus(-b) + (1 - frac_on) * _softplus(b), rel=1e-5)


def test_droploss_uses_the_predicted_box():
    cfg = _cfg("StandardROIHeads", "model.roi_heads.use_droploss=true", "model.roi_heads.droploss_iou_thresh=0.01",
               *_small())
    heads = build_roi_heads(cfg, _shapes()).train()
    a = 0.5
    # dx = 10 / wx = 1: every predicted box moves one width right, off the GT [0, 0, 10, 10]
    # (A -> [10, 0, 20, 10] touches it with zero area), so all of image 0 is dropped.
    _constant_outputs(heads, [[a, 0.0]], [[10.0, 0.0, 0.0, 0.0]])
    _, losses = heads(_features(), [IMG0_PROPOSALS, IMG1_PROPOSALS], [(64, 64), (64, 64)], _targets())
    assert losses["loss_cls"].item() == pytest.approx(2 * _softplus(a) / 7, rel=1e-5)


@pytest.mark.parametrize("use_droploss", [True, False])
def test_cascade_losses_hand_computed(use_droploss):
    cfg = _cfg("CascadeROIHeads", f"model.roi_heads.use_droploss={use_droploss}",
               "model.roi_heads.droploss_iou_thresh=0.01", *_small())
    heads = build_roi_heads(cfg, _shapes()).train()
    biases = [0.5, -1.0, 2.0]
    _constant_outputs(heads, [[x, 0.0] for x in biases], [[0.0] * 4] * 3)
    _, losses = heads(_features(), [IMG0_PROPOSALS, IMG1_PROPOSALS], [(64, 64), (64, 64)], _targets())
    assert set(losses) == {f"loss_{n}_stage{k}" for n in ("cls", "box_reg") for k in range(3)}
    dropped = 1 if use_droploss else 0
    for k, x in enumerate(biases):
        # Stage 0 labels at IoU 0.5 (A, B, GT fg); stages 1, 2 relabel the same 7 boxes (zero deltas)
        # at 0.6 / 0.7: B becomes background. D is dropped in every stage.
        n_fg = 3 if k == 0 else 2
        n_bg = 7 - n_fg - dropped
        expected = (n_fg * _softplus(-x) + n_bg * _softplus(x)) / 7
        assert losses[f"loss_cls_stage{k}"].item() == pytest.approx(expected, rel=1e-5), k
    assert losses["loss_box_reg_stage0"].item() == pytest.approx((2.5 + 5 * math.log(2.0)) / 7, rel=1e-5)
    assert losses["loss_box_reg_stage1"].item() == 0.0 and losses["loss_box_reg_stage2"].item() == 0.0


def test_training_edge_cases_and_gradients():
    cfg = _cfg("CascadeROIHeads", "model.mask_on=true", "model.roi_heads.use_droploss=true", *_small())
    heads = build_roi_heads(cfg, _shapes()).train()
    feats = {k: v.requires_grad_() for k, v in _features().items()}
    targets = _targets(True)
    targets[0] = {"boxes": torch.zeros((0, 4)), "classes": torch.zeros(0, dtype=torch.int64),
                  "masks": torch.zeros(0, 64, 64, dtype=torch.bool)}
    # No GT anywhere and no proposals in image 1: every loss is finite, the mask loss is an attached 0.
    _, losses = heads(feats, [IMG0_PROPOSALS, torch.zeros((0, 4))], [(64, 64), (64, 64)], targets)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 and v.dim() == 0 for v in losses.values())
    assert losses["loss_mask"].item() == 0.0
    sum(losses.values()).backward()
    assert feats["p2"].grad is not None
    # Standard heads with no proposal and no GT anywhere: zero losses, still attached to the graph.
    std = build_roi_heads(_cfg("StandardROIHeads", *_small()), _shapes()).train()
    no_gt = [_targets()[1], _targets()[1]]
    _, losses = std(_features(), [torch.zeros((0, 4)), torch.zeros((0, 4))], [(64, 64), (64, 64)], no_gt)
    assert losses["loss_box_reg"].item() == 0.0 and losses["loss_cls"].item() == 0.0
    sum(losses.values()).backward()
    # No proposals but GT: the appended GT boxes are the only (foreground) rows.
    _, losses = std(_features(), [torch.zeros((0, 4)), torch.zeros((0, 4))], [(64, 64), (64, 64)], _targets())
    logits = std.box_predictor.cls_score.bias.detach()  # features pooled at the GT are random: check finiteness
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"].item() > 0 and logits.shape == (2,)


def test_proposal_sampling_counts_and_gt_append():
    cfg = _cfg("StandardROIHeads", "model.roi_heads.batch_size_per_image=8", "model.roi_heads.positive_fraction=0.25",
               *_small())
    heads = build_roi_heads(cfg, _shapes())
    torch.manual_seed(0)
    gt = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    fg_props = gt.repeat(5, 1) + torch.arange(5.0)[:, None] * 0.1
    bg_props = torch.tensor([[40.0, 40.0, 50.0, 50.0]]).repeat(20, 1)
    batch = heads.label_and_sample_proposals([torch.cat([fg_props, bg_props])],
                                             [{"boxes": gt, "classes": torch.tensor([0])}])
    assert batch.counts == [8]
    assert (batch.gt_classes == 0).sum() == 2 and (batch.gt_classes == 1).sum() == 6  # 25% of 8 positive
    without = heads.label_and_sample_proposals([bg_props[:3]], [{"boxes": gt, "classes": torch.tensor([0])}])
    # The GT box itself was appended, so there is always a positive.
    assert without.counts == [4] and without.gt_classes.tolist()[0] == 0
    torch.testing.assert_close(without.boxes[0], gt[0])


# ------------------------------------------------------------------------------------------ inference
def test_cascade_inference_averages_stage_probabilities():
    cfg = _cfg("CascadeROIHeads", "model.roi_heads.score_thresh_test=0.05", *_small())
    heads = build_roi_heads(cfg, _shapes()).eval()
    l = math.log
    scores = [torch.tensor([[0.0, 0.0], [l(4.0), 0.0], [-10.0, 0.0]]),
              torch.tensor([[l(3.0), 0.0], [0.0, 0.0], [-10.0, 0.0]]),
              torch.tensor([[l(9.0), 0.0], [l(0.25), 0.0], [-10.0, 0.0]])]
    deltas = [torch.tensor([[1.0, 0, 0, 0], [5.0, 0, 0, 0], [50.0, 0, 0, 0]]),  # weights (10, 10, 5, 5)
              torch.tensor([[0.0, 2.0, 0, 0], [0.0, 0, 0, 0], [0.0, 0, 0, 0]]),  # (20, 20, 10, 10)
              torch.tensor([[0.0, 0, 15 * l(2.0), 0], [0.0, 0, 0, 0], [0.0, 0, 0, 0]])]  # (30, 30, 15, 15)
    seen = []

    def fake_stage(features, batch: ProposalBatch, stage):
        seen.append(batch.boxes.clone())
        return scores[stage], deltas[stage]

    heads.run_stage = fake_stage
    proposals = torch.tensor([[10.0, 10.0, 30.0, 30.0], [40.0, 40.0, 60.0, 60.0], [60.0, 0.0, 63.0, 10.0]])
    results, losses = heads(_features(1), [proposals], [(64, 64)])
    assert losses == {}
    # Stage inputs: proposals; stage-0 boxes clipped to 64 (the third becomes empty but is kept so the
    # stages' rows stay aligned); stage-1 boxes.
    torch.testing.assert_close(seen[0], proposals)
    torch.testing.assert_close(seen[1], torch.tensor([[12.0, 10, 32, 30], [50, 40, 64, 60], [64, 0, 64, 10]]))
    torch.testing.assert_close(seen[2], torch.tensor([[12.0, 12, 32, 32], [50, 40, 64, 60], [64, 0, 64, 10]]))
    r = results[0]
    # Probabilities (not logits) averaged: (0.5 + 0.75 + 0.9) / 3 and (0.8 + 0.5 + 0.2) / 3; the third
    # row scores ~4.5e-5 < 0.05. Boxes come from the last stage only (width doubled about x = 22).
    torch.testing.assert_close(r["scores"], torch.tensor([2.15 / 3, 0.5]))
    torch.testing.assert_close(r["boxes"], torch.tensor([[2.0, 12, 42, 32], [50, 40, 64, 60]]))
    assert r["classes"].tolist() == [0, 0] and r["classes"].dtype == torch.int64


def test_fast_rcnn_inference_single_image_rules():
    # K = 2 class-specific boxes; rows: two overlapping boxes (IoU 0.81) and one far away.
    box_a = [0.0, 0.0, 10.0, 10.0]
    box_b = [0.0, 0.0, 10.0, 9.0]
    boxes = torch.tensor([box_a + box_a, box_b + box_b, [20.0, 20, 30, 30, 20, 20, 90, 90],
                          [float("nan")] * 8])
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.02, 0.9, 0.08], [0.9, 0.05, 0.05]])
    out = fast_rcnn_inference_single_image(boxes, probs, (50, 40), score_thresh=0.05, nms_thresh=0.5, topk=100)
    # Class 0: row 0 suppresses row 1; row 2's 0.02 is below threshold. Class 1: rows 0 and 1 overlap
    # -> row 1 (0.4) kept over row 0 (0.3); row 2 kept (its box clipped to 40 x 50). The NaN row is dropped.
    assert out["scores"].tolist() == pytest.approx([0.9, 0.6, 0.4])
    assert out["classes"].tolist() == [1, 0, 1]
    torch.testing.assert_close(out["boxes"], torch.tensor([[20.0, 20, 40, 50], box_a, box_b]))
    assert out["indices"].tolist() == [2, 0, 1]
    top1 = fast_rcnn_inference_single_image(boxes, probs, (50, 40), 0.05, 0.5, topk=1)
    assert top1["scores"].tolist() == pytest.approx([0.9])
    strict = fast_rcnn_inference_single_image(boxes[:1], torch.tensor([[0.5, 0.05, 0.45]]), (50, 40), 0.05, 0.5, 100)
    assert strict["classes"].tolist() == [0]  # score must be strictly above the threshold


def test_standard_inference_outputs_with_masks():
    cfg = _cfg("StandardROIHeads", "model.mask_on=true", "model.roi_heads.score_thresh_test=0.0", *_small())
    heads = build_roi_heads(cfg, _shapes()).eval()
    with torch.no_grad():
        results, losses = heads(_features(), [IMG0_PROPOSALS, torch.zeros((0, 4))], [(64, 64), (64, 64)])
    assert losses == {} and len(results) == 2
    r0, r1 = results
    assert set(r0) == {"boxes", "scores", "classes", "mask_probs"}
    n = r0["boxes"].shape[0]
    assert n >= 1 and r0["mask_probs"].shape == (n, 28, 28) and r0["classes"].dtype == torch.int64
    assert ((r0["mask_probs"] >= 0) & (r0["mask_probs"] <= 1)).all()
    assert r1["boxes"].shape == (0, 4) and r1["mask_probs"].shape == (0, 28, 28)


# ------------------------------------------------------------------------------------ over-fitting
GT_BOXES = torch.tensor([[16.0, 20.0, 56.0, 60.0], [70.0, 30.0, 110.0, 90.0], [30.0, 80.0, 70.0, 120.0]])


def _synthetic_scene(size=128):
    """Features that show where the objects are: a per-pixel 'inside an object' map, coordinates, a bias."""
    masks = torch.zeros(3, size, size, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(GT_BOXES.int().tolist()):
        masks[i, y0:y1, x0:x1] = True
    feats = {}
    for lvl in range(2, 6):
        s = 2 ** lvl
        n = size // s
        c = (torch.arange(n, dtype=torch.float32) + 0.5) * s
        inside = masks.float().amax(0)[None, None]
        inside = torch.nn.functional.adaptive_avg_pool2d(inside, n)[0, 0]
        yy, xx = torch.meshgrid(c / size, c / size, indexing="ij")
        feats[f"p{lvl}"] = torch.stack([inside, xx, yy, torch.ones_like(xx)])[None]
    return feats, masks


def _jittered(g, n, frac):
    boxes = GT_BOXES.repeat(n, 1)
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + (torch.rand(boxes.shape, generator=g) * 2 - 1) * frac * wh




def test_overfit_recovers_gt_boxes_and_masks():
    torch.manual_seed(0)
    cfg = _cfg("CascadeROIHeads", "model.mask_on=true", "model.roi_box_head.fc_dim=128",
               "model.roi_mask_head.conv_dim=8", "model.roi_mask_head.num_conv=2",
               "model.roi_heads.batch_size_per_image=64",
               "model.roi_heads.score_thresh_test=0.0", "model.roi_heads.use_droploss=true",
               "model.roi_heads.droploss_iou_thresh=0.01")
    heads = build_roi_heads(cfg, _shapes(4)).train()
    feats, masks = _synthetic_scene()
    g = torch.Generator().manual_seed(1)
    bg = torch.rand(20, 2, generator=g) * 100
    proposals = torch.cat([_jittered(g, 12, 0.3), torch.cat([bg, bg + 10 + torch.rand(20, 2, generator=g) * 30], 1)])
    targets = [{"boxes": GT_BOXES, "classes": torch.zeros(3, dtype=torch.int64), "masks": masks}]
    opt = torch.optim.Adam(heads.parameters(), lr=3e-3)
    history = []
    for _ in range(100):
        _, losses = heads(feats, [proposals], [(128, 128)], targets)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    # Later stages' box losses are not monotone: as boxes improve, more of their rows pass the 0.6 / 0.7
    # IoU and become foreground, and the loss is normalised by all rows. Their quality is checked below.
    for key in ("loss_cls_stage0", "loss_box_reg_stage0", "loss_mask"):
        assert history[-1][key] < 0.5 * history[0][key], (key, history[0][key], history[-1][key])

    heads.eval()
    test_props = _jittered(torch.Generator().manual_seed(2), 4, 0.2)
    with torch.no_grad():
        (det,), _ = heads(feats, [test_props], [(128, 128)])
    top = det["boxes"][:3]
    iou = pairwise_iou(top, GT_BOXES)
    best, which = iou.max(dim=1)
    assert sorted(which.tolist()) == [0, 1, 2] and (best > 0.7).all(), iou
    pasted = paste_masks_in_image(det["mask_probs"][:3], top, (128, 128))
    for p, w in zip(pasted, which.tolist()):
        inter = (p & masks[w]).sum().item()
        union = (p | masks[w]).sum().item()
        assert inter / union > 0.7


def test_box_regression_loss_class_specific_and_giou():
    from cutler.modeling.roi_heads.fast_rcnn import box_regression_loss

    b2b = Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[1.0, 0.0, 11.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    deltas = torch.zeros(3, 8)
    deltas[0, 4:] = torch.tensor([1.0, 0.5, 0.0, 0.0])  # class 1's deltas of row 0
    deltas[0, :4] = 100.0  # class 0's deltas: must be ignored for a class-1 row
    deltas[2, :] = 7.0     # background row: ignored
    classes = torch.tensor([1, 0, 2])
    # Row 0 target dx = 10 * 1 / 10 = 1 -> |1 - 1| + |0.5 - 0| = 0.5; row 1 exact; / 3 rows.
    loss = box_regression_loss(deltas, proposals, gt, classes, 2, b2b)
    assert loss.item() == pytest.approx(0.5 / 3)
    # Smooth L1 with beta 1: 0.5 * 0.5^2 / 1 = 0.125.
    assert box_regression_loss(deltas, proposals, gt, classes, 2, b2b, smooth_l1_beta=1.0).item() == pytest.approx(0.125 / 3)
    # GIoU on decoded boxes: row 0 decodes to [1, 0.5, 11, 10.5] vs [1, 0, 11, 10]: IoU 95 / 105, enclosing = union.
    giou = box_regression_loss(deltas, proposals, gt, classes, 2, b2b, loss_type="giou")
    assert giou.item() == pytest.approx((1 - 95 / 105) / 3, rel=1e-5)


def test_mixed_precision_losses_are_float32():
    cfg = _cfg("CascadeROIHeads", "model.mask_on=true", "model.roi_heads.use_droploss=true", *_small())
    heads = build_roi_heads(cfg, _shapes()).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, losses = heads(_features(), [IMG0_PROPOSALS, IMG1_PROPOSALS], [(64, 64), (64, 64)], _targets(True))
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
        heads.eval()
        with torch.no_grad():
            results, _ = heads(_features(), [IMG0_PROPOSALS, IMG1_PROPOSALS], [(64, 64), (64, 64)])
    assert results[0]["scores"].dtype == torch.float32 and results[0]["mask_probs"].dtype == torch.float32
