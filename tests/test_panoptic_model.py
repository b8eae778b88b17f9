"""Panoptic FPN: Detectron2 key names and forward semantics of the semantic branch, the loss weights, and the
panoptic combination rule on hand-built cases."""
import pytest
import torch
import torch.nn.functional as F

from cutler.config import load_config
from cutler.modeling import build_model
from cutler.modeling.meta_arch.panoptic_fpn import combine_semantic_and_instance_outputs
from cutler.modeling.sem_seg_head import SemSegFPNHead
from cutler.modeling.shape_spec import ShapeSpec

SHAPES = {f"p{k}": ShapeSpec(channels=8, stride=2 ** k) for k in (2, 3, 4, 5)}


def _tiny_panoptic_cfg(*extra):
    return load_config("tiny/synthetic_cascade", ["model.meta_architecture=PanopticFPN", "model.device=cpu",
                                                  "model.sem_seg_head.num_classes=4", "model.sem_seg_head.convs_dim=32",
                                                  *extra])


def test_sem_seg_head_keys_are_detectron2s():
    head = SemSegFPNHead(SHAPES, ["p2", "p3", "p4", "p5"], num_classes=5, conv_dims=32)
    keys = set(head.state_dict())
    towers = {"p2": [0], "p3": [0], "p4": [0, 2], "p5": [0, 2, 4]}
    expected = {f"{p}.{i}.{suffix}" for p, idx in towers.items() for i in idx
                for suffix in ("weight", "norm.weight", "norm.bias")} | {"predictor.weight", "predictor.bias"}
    assert keys == expected


def test_sem_seg_head_forward_matches_the_panoptic_fpn_formula():
    """Logits recomputed with functional ops from the state dict: per level conv3x3 -> GN(32) -> ReLU -> x2
    bilinear until stride 4, summed, 1x1 predictor, x4 bilinear."""
    torch.manual_seed(0)
    head = SemSegFPNHead(SHAPES, ["p2", "p3", "p4", "p5"], num_classes=3, conv_dims=32).eval()
    feats = {k: torch.randn(2, 8, 64 // s.stride, 96 // s.stride) for k, s in SHAPES.items()}
    sd = head.state_dict()
    total = 0
    for p, idx in {"p2": [0], "p3": [0], "p4": [0, 2], "p5": [0, 2, 4]}.items():
        x = feats[p]
        for i in idx:
            x = F.conv2d(x, sd[f"{p}.{i}.weight"], padding=1)
            x = F.relu(F.group_norm(x, 32, sd[f"{p}.{i}.norm.weight"], sd[f"{p}.{i}.norm.bias"]))
            if p != "p2":
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        total = total + x
    ref = F.conv2d(total, sd["predictor.weight"], sd["predictor.bias"])
    ref = F.interpolate(ref, scale_factor=4, mode="bilinear", align_corners=False)
    out, _ = head(feats)
    assert out.shape == (2, 3, 64, 96)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the loss is the mean CE over labelled pixels; all-ignored targets give 0, not NaN
    target = torch.randint(0, 3, (2, 64, 96))
    target[0, :10] = 255
    torch.testing.assert_close(head.loss(out, target), F.cross_entropy(out, target, ignore_index=255))
    assert head.loss(out, torch.full_like(target, 255)).item() == 0.0


def _batch():
    g = torch.Generator().manual_seed(0)
    batch = []
    for h, w in [(96, 128), (128, 96)]:
        masks = torch.zeros(1, h, w, dtype=torch.bool)
        masks[0, 10:40, 20:60] = True
        sem = torch.randint(0, 4, (h, w), generator=g)
        sem[0] = 255
        batch.append({"image": torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=g),
                      "instances": {"boxes": torch.tensor([[20.0, 10.0, 60.0, 40.0]]), "classes": torch.tensor([0]),
                                    "masks": masks}, "sem_seg": sem})
    return batch


def test_panoptic_fpn_loss_weights_scale_instance_terms_only():
    cfg1, cfg2 = _tiny_panoptic_cfg(), _tiny_panoptic_cfg("model.panoptic_fpn.instance_loss_weight=2.0",
                                                          "model.sem_seg_head.loss_weight=0.5")
    torch.manual_seed(0)
    m1 = build_model(cfg1).train()
    m2 = build_model(cfg2).train()
    m2.load_state_dict(m1.state_dict())
    torch.manual_seed(1)
    l1 = m1(_batch())
    torch.manual_seed(1)
    l2 = m2(_batch())
    assert set(l1) == set(l2) and "loss_sem_seg" in l1 and "loss_mask" in l1
    for k in l1:
        factor = 0.5 if k == "loss_sem_seg" else (1.0 if k.startswith("loss_rpn") else 2.0)
        torch.testing.assert_close(l2[k], l1[k] * factor, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sem_seg"):
        m1([{k: v for k, v in d.items() if k != "sem_seg"} for d in _batch()])


def test_panoptic_fpn_inference_outputs():
    model = build_model(_tiny_panoptic_cfg()).eval()
    out = model([{"image": d["image"], "height": 50, "width": 70} for d in _batch()])
    for o in out:
        seg, info = o["panoptic_seg"]
        assert o["sem_seg"].shape == (4, 50, 70) and seg.shape == (50, 70)
        assert set(torch.unique(seg).tolist()) - {0} == {s["id"] for s in info}
        assert [s["id"] for s in info] == list(range(1, len(info) + 1))


def _instances(masks, scores, classes):
    return {"masks": torch.stack(masks), "scores": torch.tensor(scores), "classes": torch.tensor(classes)}


def test_combine_rule_on_a_hand_built_case():
    h, w = 6, 8
    sem = torch.zeros(h, w, dtype=torch.int64)
    sem[:, 4:] = 2  # class 2 on the right half (24 px), class 0 ("thing") on the left
    sem[5, :4] = 1  # 4 px of class 1
    a = torch.zeros(h, w, dtype=torch.bool)
    a[0:3, 0:3] = True  # 9 px, score 0.9
    b = torch.zeros(h, w, dtype=torch.bool)
    b[1:4, 1:4] = True  # 9 px, 4 overlap a (44% <= 0.5): kept with its 5 free pixels
    c = torch.zeros(h, w, dtype=torch.bool)
    c[0:2, 0:2] = True  # 4 px all under a (100% > 0.5): dropped
    d = torch.zeros(h, w, dtype=torch.bool)
    d[4, 6] = True  # below the score threshold: never pasted (and the loop stops there)
    inst = _instances([c, b, a, d], [0.7, 0.8, 0.9, 0.3], [5, 6, 7, 8])
    seg, info = combine_semantic_and_instance_outputs(inst, sem, 0.5, stuff_area_thresh=5, instances_score_thresh=0.5)
    assert [(s["id"], s["isthing"], s["category_id"]) for s in info] == [(1, True, 7), (2, True, 6), (3, False, 2)]
    assert [s["instance_id"] for s in info[:2]] == [2, 1]
    assert info[2]["area"] == 24  # class 1 has 4 free pixels < 5: dropped; class 2 keeps its 24
    expected = torch.zeros(h, w, dtype=torch.int32)
    expected[:, 4:] = 3
    expected[1:4, 1:4] = 2
    expected[0:3, 0:3] = 1
    assert torch.equal(seg, expected)
