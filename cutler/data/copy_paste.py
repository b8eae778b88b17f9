"""CutLER's batch-level copy-paste augmentation.

Pure functions on the mapped dicts of one batch (see :mod:`cutler.data.mapper`); they run inside the
data-loader workers (:class:`cutler.data.build.TrainBatchDataset`), so the GPU never waits for them.

For target image ``i`` of a batch of ``B`` the source is image ``B - 1 - i`` of the batch as it was before
any pasting (the published pairing). With probability ``rate``:

1. choose ``k`` source instances uniformly without replacement, ``k ~ U{1, n-1}`` (``k = 1`` when
   ``n = 1``) if ``random_num`` else all ``n``;
2. rescale the whole source image and its masks to ``(int(r * H_t), int(r * W_t))`` (bilinear; a mask pixel is
   set where the resampled mask is > 0, as published), ``r ~ U(min_ratio, max_ratio)``, and place it at a
   uniform random integer offset inside the target;
3. drop pasted instances covering >= 50% of any existing target mask (intersection / TARGET mask area);
4. paint the pasted pixels (the union of the kept pasted masks) over the target image, subtract them from
   the target masks, remove target instances that became empty, and recompute every box from its mask.
   Only the TARGET's masks are cut: pasted masks keep their rescaled extent, so pasted instances that
   overlapped in the source overlap in the result too (as published).

The published code shifts boxes along swapped axes in one branch; boxes here always come from masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from cutler.structures.masks import masks_to_boxes

OCCLUSION_THRESH = 0.5  # the published 'ioy' threshold


@dataclass
class CopyPasteParams:
    """Copy-paste settings (``cfg.dataloader.copy_paste_*``)."""

    rate: float = 1.0
    min_ratio: float = 0.3
    max_ratio: float = 1.0
    random_num: bool = True

    @classmethod
    def from_config(cls, cfg) -> "CopyPasteParams":
        d = cfg.dataloader
        return cls(float(d.copy_paste_rate), float(d.copy_paste_min_ratio), float(d.copy_paste_max_ratio),
                   bool(d.copy_paste_random_num))


def _uniform(generator: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(generator: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in ``[lo, hi]`` (inclusive)."""
    return int(torch.randint(lo, hi + 1, (), generator=generator))


def _mask_areas(masks: Tensor) -> Tensor:
    """``(N,)`` int32 pixel counts of ``(N, H, W)`` bool masks (row sums in int32: ~10x faster than ``sum``)."""
    return masks.view(torch.uint8).sum(2, dtype=torch.int32).sum(1, dtype=torch.int32)


def paste_instances(target: Dict, source: Dict, params: CopyPasteParams, generator: torch.Generator) -> Dict:
    """Paste instances of ``source`` onto ``target`` (one pair of the batch); returns a new dict.

    Args:
        target, source: mapped dicts with ``"image"`` uint8 ``[3, H, W]`` and ``"instances"`` holding
            ``"boxes"`` ``[M, 4]``, ``"classes"`` ``[M]``, ``"masks"`` bool ``[M, H, W]``.
        params: rate, ratio range and instance-count rule.
        generator: every random draw comes from it (determinism).

    Returns:
        A shallow copy of ``target`` with a new image and instances (``target`` is not modified). When the
        rate draw fails or the source has no instance, ``target`` itself is returned.
    """
    if _uniform(generator) >= params.rate:
        return target
    src_inst = source["instances"]
    n = int(src_inst["classes"].numel())
    if n == 0:
        return target
    if "masks" not in src_inst or "masks" not in target["instances"]:
        raise ValueError("copy-paste needs instance masks (dataset without segmentation?)")
    k = (_randint(generator, 1, n - 1) if n > 1 else 1) if params.random_num else n
    chosen = torch.randperm(n, generator=generator)[:k]
    r = _uniform(generator, params.min_ratio, params.max_ratio)
    _, ht, wt = target["image"].shape
    ph, pw = max(1, int(r * ht)), max(1, int(r * wt))  # truncated, as published
    y0, x0 = _randint(generator, 0, ht - ph), _randint(generator, 0, wt - pw)

    # Everything pasted lies in the window [y0, y0 + ph) x [x0, x0 + pw): work there only.
    win = (slice(None), slice(y0, y0 + ph), slice(x0, x0 + pw))
    # As published: bilinear on the 0/1 masks, then any non-zero value counts (a rescaled mask grows by its
    # partially covered border pixels rather than losing them).
    src_masks = F.interpolate(src_inst["masks"][chosen][None].float(), size=(ph, pw), mode="bilinear",
                              align_corners=False)[0] > 0
    tgt_area = _mask_areas(target["instances"]["masks"])
    keep = pasteable(target, src_masks, win, tgt_area)
    src_masks, chosen = src_masks[keep], chosen[keep]
    if src_masks.shape[0] == 0:
        return target
    # uint8 bilinear resize: torch's fast path for images, 4x cheaper than going through float. It rounds where
    # the published float resize truncates (.byte()): pasted pixels differ by at most 1 grey level.
    src_img = F.interpolate(source["image"][None], size=(ph, pw), mode="bilinear", align_corners=False)[0]
    return compose_paste(target, src_img, src_masks, src_inst["classes"][chosen], win, tgt_area)


def pasteable(target: Dict, src_masks: Tensor, win, tgt_area: Tensor) -> Tensor:
    """``(k,)`` bool: which of the ``(k, ph, pw)`` masks to paste into the target's window ``win`` (a
    ``(slice(None), rows, cols)`` index): those covering < 50% of every target mask (intersection / TARGET
    mask area ``tgt_area`` ``(M,)``, the published 'ioy') and not emptied by their rescale (the published
    code would keep an all-zero target; the mapper drops such instances as well)."""
    tgt_masks = target["instances"]["masks"]
    k = src_masks.shape[0]
    if tgt_masks.shape[0]:
        inter = src_masks.flatten(1).float() @ tgt_masks[win].flatten(1).float().T  # [k, M]
        occludes = (inter / tgt_area.clamp(min=1).float() >= OCCLUSION_THRESH).any(dim=1)
    else:
        occludes = torch.zeros(k, dtype=torch.bool)
    return ~occludes & src_masks.flatten(1).any(dim=1)


def compose_paste(target: Dict, src_img: Tensor, src_masks: Tensor, src_classes: Tensor, win, tgt_area: Tensor) -> Dict:
    """Paint the union of ``src_masks`` (``(k, ph, pw)`` bool, pasted masks are not cut by each other) with
    ``src_img`` (``(3, ph, pw)`` uint8) into the target's window ``win``, subtract it from the target masks,
    drop target instances it covers entirely, and recompute every box from its mask; returns a new dict."""
    _, ht, wt = target["image"].shape
    tgt_inst = target["instances"]
    union = src_masks.any(dim=0)  # [ph, pw]
    image = target["image"].clone()
    image[win] = torch.where(union, src_img, image[win])

    tgt_masks = tgt_inst["masks"].clone()
    removed = _mask_areas(tgt_masks[win] & union)
    tgt_masks[win] &= ~union
    alive = tgt_area - removed > 0
    pasted = torch.zeros((src_masks.shape[0], ht, wt), dtype=torch.bool)
    pasted[win] = src_masks
    masks = torch.cat([tgt_masks[alive], pasted], dim=0)
    classes = torch.cat([tgt_inst["classes"][alive], src_classes], dim=0)
    out = dict(target)
    out["image"] = image
    out["instances"] = {"boxes": masks_to_boxes(masks), "classes": classes, "masks": masks}
    if "sem_seg" in target:  # pasted pixels are instances: the "thing" class (0) of a panoptic semantic target
        sem = target["sem_seg"].clone()
        sem[win[1:]][union] = 0
        out["sem_seg"] = sem
    return out


def copy_paste_batch(batch: List[Dict], params: CopyPasteParams, generator: Optional[torch.Generator] = None) -> List[Dict]:
    """Apply copy-paste to a whole (per-device) batch: image ``i`` receives objects from image ``B-1-i``.

    Args:
        batch: mapped training dicts (see :mod:`cutler.data.mapper`); not modified.
        params: :class:`CopyPasteParams`.
        generator: a seeded ``torch.Generator`` for reproducible batches (default: a fresh one).

    Returns:
        A new list of ``B`` dicts.
    """
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    sources = list(reversed(batch))
    return [paste_instances(t, s, params, generator) for t, s in zip(batch, sources)]


def save_copy_paste_visualization(batch: List[Dict], out_dir, prefix: str) -> None:
    """Write one overlay PNG per image of a copy-pasted batch (``dataloader.visualize_copy_paste``)."""
    from pathlib import Path

    from cutler.utils.visualization import overlay_instances, save_rgb_png

    for j, d in enumerate(batch):
        inst = d.get("instances", {})
        pic = overlay_instances(d["image"].permute(1, 2, 0).numpy(),
                                masks=inst["masks"].numpy() if "masks" in inst else None,
                                boxes=inst["boxes"].numpy() if "boxes" in inst else None)
        save_rgb_png(Path(out_dir) / f"{prefix}_{j}.png", pic)
