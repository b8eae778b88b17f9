"""Two-stage detector meta-architecture (Detectron2's ``GeneralizedRCNN`` and ``ProposalNetwork``).

Model interface (what the trainer and evaluation code rely on):

* input: ``List[Dict]``, one per image: ``"image"`` ``(3, H, W)`` uint8/float RGB in 0..255, already
  resized; optional ``"height"``, ``"width"`` (original size, outputs are rescaled to it; default
  ``H``, ``W``); in training ``"instances"``: ``{"boxes": (M, 4) float XYXY resized-image pixels,
  "classes": (M,) int64, "masks": (M, H, W) bool (mask_on)}``.
* training: ``Dict[str, Tensor]`` of scalar losses.
* eval: ``[{"instances": {"boxes": (N, 4) original pixels, "scores": (N,), "classes": (N,) int64,
  "masks": (N, height, width) bool (mask_on)}}]``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ...structures.boxes import clip_boxes, nonempty_boxes


def pad_and_stack(images: List[Tensor], size_divisibility: int, pad_value: float = 0.0) -> Tensor:
    """Stack ``(C, Hi, Wi)`` images into ``(N, C, Hp, Wp)``, padding bottom/right with ``pad_value`` so
    that ``Hp``/``Wp`` are the batch maxima rounded up to a multiple of ``size_divisibility``."""
    max_h = max(img.shape[-2] for img in images)
    max_w = max(img.shape[-1] for img in images)
    if size_divisibility > 1:
        d = size_divisibility
        max_h = (max_h + d - 1) // d * d
        max_w = (max_w + d - 1) // d * d
    batch = images[0].new_full((len(images), images[0].shape[0], max_h, max_w), pad_value)
    for i, img in enumerate(images):
        batch[i, :, : img.shape[-2], : img.shape[-1]].copy_(img)
    return batch


class _DetectorBase(nn.Module):
    """Shared input handling: normalisation, padding, device, autocast, channels_last."""

    def __init__(self, backbone: nn.Module, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False, input_format: str = "RGB"):
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        self.backbone = backbone
        # Inputs are always RGB; "BGR" means the weights (and pixel_mean/std) expect BGR channel order,
        # as with Caffe2/Detectron2 models trained with INPUT.FORMAT BGR, so the channels are flipped.
        self.input_format = input_format
        # Non-persistent: Detectron2 checkpoints do not contain them either.
        self.register_buffer("pixel_mean", torch.tensor(list(pixel_mean), dtype=torch.float32).view(-1, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(list(pixel_std), dtype=torch.float32).view(-1, 1, 1),
                             persistent=False)
        if self.pixel_mean.shape != self.pixel_std.shape:
            raise ValueError(f"pixel_mean {list(pixel_mean)} and pixel_std {list(pixel_std)} differ in length")
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def _autocast(self):
        """Autocast on CUDA when an AMP dtype is configured; a no-op on CPU (the deterministic path)."""
        if self.amp_dtype is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def preprocess_image(self, batched_inputs: List[Dict[str, Any]]) -> Tuple[Tensor, List[Tuple[int, int]]]:
        """Normalise ``(x - mean) / std``, then pad with zeros to a multiple of the backbone's
        ``size_divisibility`` (Detectron2 pads after normalisation). Returns ``(N, 3, Hp, Wp)`` and
        the unpadded ``(h, w)`` of each image."""
        images = [d["image"].to(self.device, non_blocking=True).float() for d in batched_inputs]
        if self.input_format == "BGR":
            images = [img.flip(0) for img in images]
        images = [(img - self.pixel_mean) / self.pixel_std for img in images]
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch = pad_and_stack(images, getattr(self.backbone, "size_divisibility", 0))
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch, sizes

    def _targets(self, batched_inputs: List[Dict[str, Any]]) -> List[Dict[str, Tensor]]:
        if any("instances" not in d for d in batched_inputs):
            raise ValueError("training inputs need an 'instances' dict per image")
        return [{k: (v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v)
                 for k, v in d["instances"].items()} for d in batched_inputs]

    @staticmethod
    def _output_size(d: Dict[str, Any]) -> Tuple[int, int]:
        return int(d.get("height", d["image"].shape[-2])), int(d.get("width", d["image"].shape[-1]))


def rescale_boxes(boxes: Tensor, input_hw: Tuple[int, int], output_hw: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
    """Scale ``(N, 4)`` XYXY boxes from an ``input_hw`` image to ``output_hw`` (x by out_w/in_w, y by
    out_h/in_h), clip to ``output_hw``; returns the boxes and the ``(N,)`` keep mask of non-empty ones."""
    sx = output_hw[1] / input_hw[1]
    sy = output_hw[0] / input_hw[0]
    scale = boxes.new_tensor([sx, sy, sx, sy])
    boxes = clip_boxes(boxes * scale, output_hw)
    return boxes, nonempty_boxes(boxes)


class GeneralizedRCNN(_DetectorBase):
    """Backbone -> RPN -> ROI heads.

    Args:
        backbone: returns ``Dict[str, Tensor]`` features; has ``size_divisibility`` and ``output_shape()``.
        proposal_generator: the :class:`~cutler.modeling.proposal_generator.RPN`.
        roi_heads: module with the ROI-heads contract (features, proposals, image_sizes, targets) ->
            (per-image results, losses).
        pixel_mean, pixel_std: RGB, 0..255 units.
        mask_on: produce/expect masks.
        amp_dtype: autocast dtype on CUDA (None = full precision).
        channels_last: run convolutions in channels-last memory format.
        mask_threshold: probability threshold of pasted masks.
        input_format: channel order the weights expect ("RGB", or "BGR" to flip the RGB inputs).
    """

    def __init__(self, *, backbone: nn.Module, proposal_generator: nn.Module, roi_heads: nn.Module,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float], mask_on: bool = False,
                 amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False, mask_threshold: float = 0.5,
                 input_format: str = "RGB"):
        super().__init__(backbone, pixel_mean, pixel_std, amp_dtype, channels_last, input_format)
        self.proposal_generator = proposal_generator
        self.roi_heads = roi_heads
        self.mask_on = mask_on
        self.mask_threshold = mask_threshold

    def forward(self, batched_inputs: List[Dict[str, Any]]):
        """Losses (training) or per-image detections (eval); see the module docstring."""
        if not self.training:
            return self.inference(batched_inputs)
        images, sizes = self.preprocess_image(batched_inputs)
        targets = self._targets(batched_inputs)
        with self._autocast():
            features = self.backbone(images)
            proposals, proposal_losses = self.proposal_generator(features, sizes, [t["boxes"] for t in targets])
            _, detector_losses = self.roi_heads(features, [p["boxes"] for p in proposals], sizes, targets)
        losses = dict(detector_losses)
        losses.update(proposal_losses)
        return losses

    @torch.no_grad()
    def inference(self, batched_inputs: List[Dict[str, Any]], do_postprocess: bool = True) -> List[Dict[str, Any]]:
        """Detections per image, rescaled to each input's ``height``/``width`` when ``do_postprocess``
        (otherwise the raw ROI-head results in resized-image pixels)."""
        images, sizes = self.preprocess_image(batched_inputs)
        with self._autocast():
            features = self.backbone(images)
            proposals, _ = self.proposal_generator(features, sizes, None)
            results, _ = self.roi_heads(features, [p["boxes"] for p in proposals], sizes, None)
        if not do_postprocess:
            return results
        return [{"instances": self.postprocess(r, hw, self._output_size(d))}
                for r, hw, d in zip(results, sizes, batched_inputs)]

    def postprocess(self, result: Dict[str, Tensor], input_hw: Tuple[int, int],
                    output_hw: Tuple[int, int]) -> Dict[str, Tensor]:
        """Detectron2's ``detector_postprocess``: scale boxes to the original size, clip, drop empty
        boxes, paste mask probabilities at the scaled boxes and threshold them."""
        boxes, keep = rescale_boxes(result["boxes"].float(), input_hw, output_hw)
        out = {"boxes": boxes[keep], "scores": result["scores"][keep].float(),
               "classes": result["classes"][keep].long()}
        if self.mask_on:
            if "mask_probs" not in result:
                raise KeyError("mask_on=True but the ROI heads returned no 'mask_probs'")
            from ..roi_heads import paste_masks_in_image

            out["masks"] = paste_masks_in_image(result["mask_probs"][keep].float(), out["boxes"], output_hw,
                                                threshold=self.mask_threshold)
        return out


class ProposalNetwork(_DetectorBase):
    """Backbone -> RPN only (Detectron2's ``ProposalNetwork``): losses in training; in eval
    ``[{"proposals": {"boxes": (K, 4) original pixels, "objectness_logits": (K,)}}]``."""

    def __init__(self, *, backbone: nn.Module, proposal_generator: nn.Module, pixel_mean: Sequence[float],
                 pixel_std: Sequence[float], amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False,
                 input_format: str = "RGB"):
        super().__init__(backbone, pixel_mean, pixel_std, amp_dtype, channels_last, input_format)
        self.proposal_generator = proposal_generator

    def forward(self, batched_inputs: List[Dict[str, Any]]):
        images, sizes = self.preprocess_image(batched_inputs)
        gt = [t["boxes"] for t in self._targets(batched_inputs)] if self.training else None
        with self._autocast(), torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            features = self.backbone(images)
            proposals, losses = self.proposal_generator(features, sizes, gt)
        if self.training:
            return losses
        outputs = []
        for p, hw, d in zip(proposals, sizes, batched_inputs):
            boxes, keep = rescale_boxes(p["boxes"].float(), hw, self._output_size(d))
            outputs.append({"proposals": {"boxes": boxes[keep], "objectness_logits": p["objectness_logits"][keep]}})
        return outputs
