"""Meta-architecture contract: preprocessing, padding, postprocessing, training wiring, build_model."""
import pytest
import torch
from torch import nn

from cutler.config import load_config
from cutler.modeling import build_model
from cutler.modeling.backbone import build_backbone
from cutler.modeling.meta_arch import GeneralizedRCNN, pad_and_stack, rescale_boxes
from cutler.modeling.proposal_generator import build_rpn

SMALL = ["model.device=cpu", "model.resnets.norm=FrozenBN", "model.backbone.freeze_at=0",
         "model.resnets.stride_in_1x1=false", "model.pixel_mean=[123.675,116.28,103.53]",
         "model.pixel_std=[58.395,57.12,57.375]", "model.rpn.pre_nms_topk_test=200", "model.rpn.post_nms_topk_test=100",
         "model.rpn.pre_nms_topk_train=200", "model.rpn.post_nms_topk_train=100"]


def test_pad_and_stack_to_multiple_of_32():
    a = torch.ones(3, 50, 70)
    b = torch.full((3, 64, 33), 2.0)
    out = pad_and_stack([a, b], 32)
    assert out.shape == (2, 3, 64, 96)
    assert torch.equal(out[0, :, :50, :70], a) and out[0, :, 50:].abs().sum() == 0 and out[0, :, :, 70:].abs().sum() == 0
    assert torch.equal(out[1, :, :, :33], b) and out[1, :, :, 33:].abs().sum() == 0
    assert pad_and_stack([torch.zeros(3, 64, 64)], 32).shape == (1, 3, 64, 64)


def test_rescale_boxes_scales_clips_and_flags_empty():
    boxes = torch.tensor([[10.0, 20, 30, 40], [90, 10, 120, 30], [105, 0, 130, 10]])
    out, keep = rescale_boxes(boxes, (50, 100), (100, 150))  # x * 1.5, y * 2
    torch.testing.assert_close(out, torch.tensor([[15.0, 40, 45, 80], [135, 20, 150, 60], [150, 0, 150, 20]]))
    assert keep.tolist() == [True, True, False]


class _StubROIHeads(nn.Module):
    """Implements the ROI-heads contract with fixed outputs and records its inputs."""

    def __init__(self, results):
        super().__init__()
        self.results = results
        self.calls = []
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, features, proposals, image_sizes, targets=None):
        self.calls.append(dict(features=features, proposals=proposals, image_sizes=image_sizes, targets=targets))
        if self.training:
            return [], {"loss_cls": self.scale * sum(f.float().mean() for f in features.values()) * 0 + self.scale}
        return self.results, {}


_STUB_CACHE = {}


def _stub_model(results, mask_on=False):
    """A GeneralizedRCNN over a stub ROI head; the R-50 backbone is built once per test session."""
    if "model" not in _STUB_CACHE:
        cfg = load_config(None, SMALL)
        torch.manual_seed(0)
        backbone = build_backbone(cfg)
        _STUB_CACHE["model"] = GeneralizedRCNN(
            backbone=backbone, proposal_generator=build_rpn(cfg, backbone.output_shape()),
            roi_heads=_StubROIHeads([]), pixel_mean=[10.0, 20.0, 30.0], pixel_std=[2.0, 4.0, 5.0])
    model = _STUB_CACHE["model"]
    model.roi_heads.results, model.roi_heads.calls = results, []
    model.mask_on, model.input_format, model.amp_dtype = mask_on, "RGB", None
    model.zero_grad(set_to_none=True)
    return model


def test_preprocess_normalises_rgb_then_pads_with_zero():
    model = _stub_model([])
    img = torch.stack([torch.full((40, 50), 12.0), torch.full((40, 50), 28.0), torch.full((40, 50), 40.0)])
    images, sizes = model.preprocess_image([{"image": img.to(torch.uint8)}])
    assert sizes == [(40, 50)] and images.shape == (1, 3, 64, 64)
    torch.testing.assert_close(images[0, :, 0, 0], torch.tensor([1.0, 2.0, 2.0]))
    assert images[0, :, 40:].abs().sum() == 0 and images[0, :, :, 50:].abs().sum() == 0
    model.input_format = "BGR"  # weights expecting BGR: the RGB input is flipped before normalising
    images, _ = model.preprocess_image([{"image": img}])
    torch.testing.assert_close(images[0, :, 0, 0], torch.tensor([(40 - 10) / 2.0, (28 - 20) / 4.0, (12 - 30) / 5.0]))


def test_inference_postprocess_rescales_to_original_size_and_pastes_masks():
    result = {"boxes": torch.tensor([[8.0, 4, 24, 20], [60, 0, 70, 10]]), "scores": torch.tensor([0.9, 0.4]),
              "classes": torch.tensor([0, 0]), "mask_probs": torch.ones(2, 28, 28)}
    model = _stub_model([result], mask_on=True).eval()
    out = model([{"image": torch.zeros(3, 40, 60, dtype=torch.uint8), "height": 80, "width": 90}])
    inst = out[0]["instances"]
    # scale x 90/60 = 1.5, y 80/40 = 2; the second box starts past the image and is removed as empty.
    torch.testing.assert_close(inst["boxes"], torch.tensor([[12.0, 8, 36, 40]]))
    torch.testing.assert_close(inst["scores"], torch.tensor([0.9]))
    assert inst["classes"].dtype == torch.int64
    assert inst["masks"].shape == (1, 80, 90) and inst["masks"].dtype == torch.bool
    assert inst["masks"][0, 8:40, 12:36].all() and inst["masks"].sum() == 32 * 24
    call = model.roi_heads.calls[-1]
    assert call["image_sizes"] == [(40, 60)] and call["targets"] is None
    assert set(call["features"]) == {"p2", "p3", "p4", "p5", "p6"} and call["features"]["p2"].shape[-2:] == (16, 16)
    assert all(not p.requires_grad and p.shape[1] == 4 for p in call["proposals"])


def test_inference_defaults_to_input_size():
    result = {"boxes": torch.tensor([[8.0, 4, 24, 20]]), "scores": torch.tensor([0.9]), "classes": torch.tensor([0])}
    model = _stub_model([result]).eval()
    out = model([{"image": torch.zeros(3, 40, 60)}])
    torch.testing.assert_close(out[0]["instances"]["boxes"], result["boxes"])
    assert "masks" not in out[0]["instances"]


def test_training_returns_rpn_and_head_losses_and_passes_targets():
    model = _stub_model([]).train()
    inst = {"boxes": torch.tensor([[4.0, 4, 30, 30]]), "classes": torch.tensor([0])}
    losses = model([{"image": torch.zeros(3, 40, 60), "instances": inst},
                    {"image": torch.zeros(3, 64, 32), "instances": {"boxes": torch.zeros(0, 4),
                                                                   "classes": torch.zeros(0, dtype=torch.long)}}])
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls"}
    sum(losses.values()).backward()
    call = model.roi_heads.calls[-1]
    assert call["image_sizes"] == [(40, 60), (64, 32)] and torch.equal(call["targets"][0]["boxes"], inst["boxes"])
    assert len(call["proposals"]) == 2 and not call["proposals"][0].requires_grad
    with pytest.raises(ValueError, match="instances"):
        model([{"image": torch.zeros(3, 40, 60)}])


def test_proposal_network_is_deterministic_on_cpu_and_channels_last_matches():
    model = build_model(load_config(None, SMALL + ["model.meta_architecture=ProposalNetwork"])).eval()
    torch.manual_seed(0)
    batch = [{"image": torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8), "height": 128, "width": 192}]
    a = model(batch)[0]["proposals"]
    b = model(batch)[0]["proposals"]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["objectness_logits"], b["objectness_logits"])
    assert (a["boxes"][:, 2] <= 192).all() and (a["boxes"][:, 3] <= 128).all()
    model.channels_last = True
    model.to(memory_format=torch.channels_last)
    c = model(batch)[0]["proposals"]
    torch.testing.assert_close(c["objectness_logits"][:10], a["objectness_logits"][:10], rtol=1e-3, atol=1e-3)


def test_build_model_rejects_unknown_meta_architecture():
    with pytest.raises(ValueError, match="meta_architecture"):
        build_model(load_config(None, SMALL + ["model.meta_architecture=RetinaNet"]))


# ------------------------------------------------------------------- full model (with the ROI heads)
CASCADE = SMALL + ["model.mask_on=true", "model.roi_heads.name=CascadeROIHeads", "model.roi_heads.num_classes=1",
                   "model.roi_heads.batch_size_per_image=64", "model.roi_box_head.num_fc=2",
                   "model.roi_box_head.pooler_resolution=7", "model.roi_box_head.cls_agnostic_bbox_reg=true",
                   "model.roi_mask_head.num_conv=4", "model.roi_heads.score_thresh_test=0.0"]


@pytest.fixture(scope="module")
def cascade_model():
    torch.manual_seed(0)
    return build_model(load_config(None, CASCADE))


def test_full_model_has_the_published_detectron2_keys(cascade_model):
    keys = set(cascade_model.state_dict())
    published = {
        "backbone.bottom_up.res2.0.conv1.weight", "backbone.bottom_up.res2.0.conv1.norm.weight",
        "backbone.fpn_lateral2.weight", "backbone.fpn_output2.weight", "proposal_generator.rpn_head.conv.weight",
        "proposal_generator.rpn_head.objectness_logits.weight", "proposal_generator.rpn_head.anchor_deltas.weight",
        "roi_heads.box_head.0.fc1.weight", "roi_heads.box_predictor.0.cls_score.weight",
        "roi_heads.box_predictor.0.bbox_pred.weight", "roi_heads.mask_head.mask_fcn1.weight",
        "roi_heads.mask_head.deconv.weight", "roi_heads.mask_head.predictor.weight"}
    assert published <= keys
    assert not any(k.startswith(("pixel_", "proposal_generator.anchor_generator")) for k in keys)


def test_full_model_eval_and_train_contract(cascade_model):
    model = cascade_model
    torch.manual_seed(1)
    img = torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8)
    model.eval()
    inst = model([{"image": img, "height": 128, "width": 150}])[0]["instances"]
    assert set(inst) == {"boxes", "scores", "classes", "masks"}
    n = inst["boxes"].shape[0]
    assert 0 < n <= 100 and inst["scores"].shape == (n,) and inst["classes"].dtype == torch.int64
    assert inst["masks"].shape == (n, 128, 150) and inst["masks"].dtype == torch.bool
    assert (inst["boxes"][:, 2] <= 150).all() and (inst["boxes"][:, 3] <= 128).all()
    model.train()
    masks = torch.zeros(1, 64, 96, dtype=torch.bool)
    masks[0, 10:40, 20:70] = True
    losses = model([{"image": img, "instances": {"boxes": torch.tensor([[20.0, 10, 70, 40]]),
                                                 "classes": torch.tensor([0]), "masks": masks}}])
    assert {"loss_rpn_cls", "loss_rpn_loc", "loss_mask"} <= set(losses)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.proposal_generator.rpn_head.conv.weight.grad is not None
    assert model.backbone.bottom_up.stem.conv1.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_amp_dtype_from_config_and_cpu_path_stays_float32():
    import contextlib

    from cutler.modeling.build import amp_dtype_from_cfg

    assert amp_dtype_from_cfg(load_config(None, [])) is None
    assert amp_dtype_from_cfg(load_config(None, ["solver.amp.enabled=true", "solver.amp.dtype=bfloat16"])) \
        is torch.bfloat16
    assert amp_dtype_from_cfg(load_config(None, ["solver.amp.enabled=true"])) is torch.float16
    with pytest.raises(ValueError, match="solver.amp.dtype"):
        amp_dtype_from_cfg(load_config(None, ["solver.amp.enabled=true", "solver.amp.dtype=int8"]))
    model = _stub_model([])
    model.amp_dtype = torch.float16
    assert isinstance(model._autocast(), contextlib.nullcontext)  # CPU: deterministic float32 path
