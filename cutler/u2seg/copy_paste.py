"""U2Seg's semantic-aware copy-paste: paste an instance of the same cluster as one already in the image.

For each target image of a batch, with probability ``rate``:

1. pick one of its instances uniformly; its class ``c`` (a cluster) is the one to paste;
2. pick a source instance of class ``c`` uniformly over the whole training set (the source image is
   decoded and augmented like any training sample, with its own seeded generator), and keep, among that
   image's instances of class ``c``, one chosen uniformly (a random one when the mapper kept several);
3. transform it: its box is cut out with its mask, resized by ``r ~ U(min_ratio, max_ratio)`` (shrunk
   further if it would not fit in the target), and shifted to a uniform random position;
4. paste it with CutLER's rules: ``I3 = I1 * (1 - T(M)) + I2 * T(M)``, skipped when it would cover >= 50%
   of an existing target mask, target masks cut by it, boxes recomputed from the masks.

The copy-paste of CutLER (:mod:`cutler.data.copy_paste`, any instance of the reversed batch) stays the
default; this one is chosen with ``u2seg.copy_paste_pairing=same_cluster``. Over hundreds of clusters
the batch itself rarely holds two instances of one cluster, hence the dataset-wide index.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cutler.data.copy_paste import CopyPasteParams, _mask_areas, _randint, _uniform, compose_paste, pasteable
from cutler.utils.image import ImageReadError
from cutler.utils.logging import get_logger

logger = get_logger(__name__)

PAIRINGS = ("any", "same_cluster")
_SOURCE_STREAM = 2**40 + 17  # keeps source images' augmentation draws apart from the samples' own


def source_rng(seed: int, position: int) -> np.random.Generator:
    """The augmentation generator of the source image pasted into the sample at stream ``position``."""
    return np.random.default_rng([int(seed) % 2**63, int(position), _SOURCE_STREAM])


def transform_instance(image: torch.Tensor, mask: torch.Tensor, ratio: float, max_hw: tuple
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut one instance out of its image and resize it.

    Args:
        image: ``(3, H, W)`` uint8; mask: ``(H, W)`` bool, non-empty.
        ratio: scale factor of the instance's box.
        max_hw: the largest ``(h, w)`` allowed (the target image); a larger result is shrunk to fit,
            keeping the aspect ratio.

    Returns:
        ``((3, h, w) uint8 pixels, (h, w) bool mask)``: bilinear resizes, the mask kept where > 0 (as
        CutLER's copy-paste resizes its masks).
    """
    ys, xs = torch.nonzero(mask, as_tuple=True)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    h, w = y1 - y0, x1 - x0
    nh, nw = max(1, int(ratio * h)), max(1, int(ratio * w))
    if nh > max_hw[0] or nw > max_hw[1]:
        fit = min(max_hw[0] / nh, max_hw[1] / nw)
        nh, nw = max(1, min(max_hw[0], int(nh * fit))), max(1, min(max_hw[1], int(nw * fit)))
    crop = image[None, :, y0:y1, x0:x1]
    pixels = F.interpolate(crop, size=(nh, nw), mode="bilinear", align_corners=False)[0]
    m = F.interpolate(mask[None, None, y0:y1, x0:x1].float(), size=(nh, nw), mode="bilinear", align_corners=False)
    return pixels, m[0, 0] > 0


class SameClusterCopyPaste:
    """The same-cluster copy-paste of a training set, as a batch transform for the data-loader workers.

    Args:
        records: the training records (``annotations[*]["category_id"]`` contiguous class = cluster - 1).
        params: rate and ratio range (``dataloader.copy_paste_*``); ``random_num`` does not apply (one
            instance per paste).
        seed: the training seed (source images' augmentation).
    """

    def __init__(self, records: Sequence[Dict], params: CopyPasteParams, seed: int):
        classes, owners = [], []
        for i, r in enumerate(records):
            for a in r["annotations"]:
                if not a.get("iscrowd", 0):
                    classes.append(int(a["category_id"]))
                    owners.append(i)
        order = np.argsort(np.asarray(classes, np.int64), kind="stable")
        self._classes = np.asarray(classes, np.int64)[order]
        self._owners = np.asarray(owners, np.int64)[order]  # record of each instance, grouped by class
        self.params, self.seed = params, int(seed)

    def sources(self, cls: int) -> np.ndarray:
        """Record indices holding an instance of class ``cls``, once per such instance."""
        lo, hi = np.searchsorted(self._classes, [cls, cls + 1])
        return self._owners[lo:hi]

    def paste(self, target: Dict, position: int, generator: torch.Generator, records: Sequence[Dict],
              mapper: Callable) -> Dict:
        """Paste into one mapped ``target`` (the sample at stream ``position``); returns ``target`` itself
        when nothing is pasted, else a new dict (see the module docstring)."""
        p = self.params
        if _uniform(generator) >= p.rate:
            return target
        classes = target["instances"]["classes"]
        if classes.numel() == 0:
            return target
        cls = int(classes[_randint(generator, 0, classes.numel() - 1)])
        pool = self.sources(cls)
        if len(pool) == 0:
            return target
        record = records[int(pool[_randint(generator, 0, len(pool) - 1)])]
        try:
            source = mapper(record, source_rng(self.seed, position))
        except ImageReadError as e:
            logger.warning("same-cluster copy-paste: source %s unreadable (%s); nothing pasted", e.path, e.reason)
            return target
        same = torch.nonzero(source["instances"]["classes"] == cls, as_tuple=True)[0]
        if same.numel() == 0 or "masks" not in source["instances"]:
            return target  # the mapper dropped it (vanished in the resize), or the data has no masks
        k = int(same[_randint(generator, 0, same.numel() - 1)])
        ratio = _uniform(generator, p.min_ratio, p.max_ratio)
        _, ht, wt = target["image"].shape
        pixels, mask = transform_instance(source["image"], source["instances"]["masks"][k], ratio, (ht, wt))
        ph, pw = mask.shape
        y0, x0 = _randint(generator, 0, ht - ph), _randint(generator, 0, wt - pw)
        win = (slice(None), slice(y0, y0 + ph), slice(x0, x0 + pw))
        tgt_area = _mask_areas(target["instances"]["masks"])
        if not bool(pasteable(target, mask[None], win, tgt_area)[0]):
            return target
        return compose_paste(target, pixels, mask[None], classes.new_tensor([cls]), win, tgt_area)

    def __call__(self, batch: List[Dict], positions: Sequence[int], generator: torch.Generator,
                 records: Sequence[Dict], mapper: Callable) -> List[Dict]:
        """:meth:`paste` for every sample of a batch (``positions``: their stream positions)."""
        return [self.paste(t, pos, generator, records, mapper) for t, pos in zip(batch, positions)]


def build_copy_paste(cfg, records: Sequence[Dict], params: CopyPasteParams, seed: int):
    """The copy-paste of a config: ``params`` (CutLER's pairing) or a :class:`SameClusterCopyPaste`.

    Raises:
        ValueError: an unknown ``u2seg.copy_paste_pairing``, or same-cluster pairing on one class.
    """
    from omegaconf import OmegaConf

    pairing = OmegaConf.select(cfg, "u2seg.copy_paste_pairing", default="any")
    if pairing not in PAIRINGS:
        raise ValueError(f"u2seg.copy_paste_pairing={pairing!r}; choose one of {PAIRINGS}")
    if pairing == "any":
        return params
    if int(cfg.model.roi_heads.num_classes) < 2:
        raise ValueError("u2seg.copy_paste_pairing=same_cluster needs cluster labels "
                         "(model.roi_heads.num_classes > 1 and a cluster-labelled training file)")
    return SameClusterCopyPaste(records, params, seed)
