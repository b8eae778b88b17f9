"""STEGO over a dataset: nearest neighbours, training, the cluster probe, and sharded label inference.

Layout under ``stego.out_dir``::

    knn/features-00000.npy ...   global DINO feature of every training view, in chunks (resumable)
    knn/nns.npy                  (V, K) nearest views of every view (faiss, inner product)
    train/checkpoint.pth         head + optimizer + step, written every checkpoint_period steps (resume)
    train/metrics.jsonl, train/tensorboard/
    stego_final.pth              {"head", "centroids", "in_dim", "dim", "step"}: what inference loads
    labels/<image path>.png      uint8 stuff label per pixel: 1..S, 0 = none (a failed image has no file)
    shards/shard-XXXXX-of-YYYYY/failures.jsonl, summary.json

Training views are crops (``stego.crop``) of every image resized to ``res``; a view's partner is one of its
``num_neighbors`` nearest views, drawn per step. Every random draw comes from a generator seeded by
``(seed, step)``, so a resumed run continues as the uninterrupted one would.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cutler.checkpoint import torch_load_weights_only
from cutler.maskcut.dataset import ImageRecord, MaskCutImages, collate_items
from cutler.utils.image import ImageReadError, read_image_rgb
from cutler.utils.io import atomic_torch_save, atomic_write_bytes, atomic_write_json
from cutler.utils.logging import get_logger

from .stego import (PairWeights, StegoHead, cluster_log_probs, crf_refine, dino_patch_tokens, fit_cluster_probe,
                    global_features, stego_pair_losses)

logger = get_logger(__name__)

FEATURE_CHUNK = 1024  # views per global-feature chunk file


def _extractor(c, device: torch.device):
    from cutler.maskcut.vit import DinoFeatureExtractor

    return DinoFeatureExtractor(c.vit_arch, c.patch_size, "k", c.pretrain_path, c.dtype,
                                "for STEGO (no stego.pretrain_path given): the stuff segments are meaningless "
                                "except for tests and demos").to(device)


def _device(c) -> torch.device:
    from cutler.utils.device import resolve_device

    return resolve_device(c.device)


def _generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([int(seed), int(step), int(salt)]).generate_state(1, np.uint64)[0] >> 1))
    return g


# ----------------------------------------------------------------------------------------- views
def crop_boxes(height: int, width: int, crop: str, ratio: float) -> List[Tuple[int, int, int, int]]:
    """The training views of an image as ``(y0, x0, h, w)`` boxes: ``"five"`` = the four corners and the centre
    at ``ratio`` of each side, ``"center"`` = the largest centred square."""
    if crop == "five":
        h, w = max(1, int(height * ratio)), max(1, int(width * ratio))
        cy, cx = (height - h) // 2, (width - w) // 2
        return [(0, 0, h, w), (0, width - w, h, w), (height - h, 0, h, w), (height - h, width - w, h, w), (cy, cx, h, w)]
    if crop == "center":
        s = min(height, width)
        return [((height - s) // 2, (width - s) // 2, s, s)]
    raise ValueError(f"stego.crop must be 'five' or 'center', got {crop!r}")


def views_per_image(crop: str) -> int:
    return 5 if crop == "five" else 1


def load_view(record: ImageRecord, view: int, crop: str, ratio: float, res: int) -> np.ndarray:
    """``(res, res, 3)`` uint8 RGB crop ``view`` of an image (bicubic resize)."""
    image = read_image_rgb(record.path)
    y0, x0, h, w = crop_boxes(image.shape[0], image.shape[1], crop, ratio)[view]
    return np.asarray(Image.fromarray(image[y0:y0 + h, x0:x0 + w]).resize((res, res), Image.BICUBIC))


class _Views(torch.utils.data.Dataset):
    """View ``v`` -> ``(v, image or None)``; an unreadable image gives None (recorded by the caller)."""

    def __init__(self, records: Sequence[ImageRecord], c):
        self.records, self.c = list(records), c
        self.per = views_per_image(c.crop)

    def __len__(self) -> int:
        return len(self.records) * self.per

    def __getitem__(self, v: int):
        rec = self.records[v // self.per]
        try:
            return v, load_view(rec, v % self.per, self.c.crop, self.c.crop_ratio, self.c.res)
        except (ImageReadError, OSError, ValueError) as e:
            return v, f"{type(e).__name__}: {e}"


def _to_batch(arrays: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).to(device, non_blocking=True).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------- nearest neighbours
def compute_neighbours(c, records: Sequence[ImageRecord], progress: bool = True, extractor=None) -> np.ndarray:
    """``(V, K)`` nearest views of every training view (itself excluded), from chunked, resumable global
    features; unreadable views get ``-1`` rows and are never drawn."""
    import faiss
    from tqdm import tqdm

    out = Path(c.out_dir) / "knn"
    nns_path = out / "nns.npy"
    if nns_path.is_file():
        return np.load(nns_path)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(c) if extractor is None else next(extractor.parameters()).device
    dataset = _Views(records, c)
    n = len(dataset)
    chunks = []
    for start in tqdm(range(0, n, FEATURE_CHUNK), desc="stego knn features", disable=not progress):
        path = out / f"features-{start // FEATURE_CHUNK:05d}.npy"
        chunks.append(path)
        if path.is_file():
            continue
        extractor = extractor or _extractor(c, device)
        idx = list(range(start, min(n, start + FEATURE_CHUNK)))
        feats = np.full((len(idx), extractor.vit.embed_dim), np.nan, np.float32)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=c.batch_size,
                                             num_workers=c.num_workers, collate_fn=collate_items)
        for batch in loader:
            good = [(v, img) for v, img in batch if not isinstance(img, str)]
            for v, img in batch:
                if isinstance(img, str):
                    logger.warning("stego: view %d of %s unusable (%s)", v % dataset.per, records[v // dataset.per].path, img)
            if good:
                g = global_features(dino_patch_tokens(extractor, _to_batch([img for _, img in good], device)))
                feats[[v - start for v, _ in good]] = g.cpu().numpy()
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, feats)
        os.replace(tmp, path)
    feats = np.concatenate([np.load(p) for p in chunks])
    valid = ~np.isnan(feats).any(1)
    k = min(int(c.num_neighbors), int(valid.sum()) - 1)
    if k < 1:
        raise RuntimeError(f"STEGO needs at least 2 readable training views, got {int(valid.sum())}")
    index = faiss.IndexFlatIP(feats.shape[1])
    good = np.flatnonzero(valid)
    index.add(np.ascontiguousarray(feats[good]))
    _, found = index.search(np.ascontiguousarray(feats[good]), k + 1)
    nns = np.full((n, k), -1, np.int64)
    for row, v in enumerate(good):
        others = [x for x in good[found[row]] if x != v][:k]  # faiss may rank a duplicate before the view itself
        nns[v, : len(others)] = others
    np.save(nns_path, nns)
    return nns


# ------------------------------------------------------------------------------------------ training
class _PairBatches(torch.utils.data.Dataset):
    """Step ``s`` -> ``(views (B, res, res, 3) uint8, partners (B, res, res, 3) uint8)`` for that step's draw."""

    def __init__(self, records: Sequence[ImageRecord], nns: np.ndarray, c):
        self.views = _Views(records, c)
        self.nns, self.c = nns, c
        self.valid = np.flatnonzero(nns[:, 0] >= 0)

    def __len__(self) -> int:
        return int(self.c.max_steps)

    def __getitem__(self, step: int):
        g = np.random.default_rng([int(self.c.seed), int(step)])
        chosen = self.valid[g.integers(len(self.valid), size=int(self.c.batch_size))]
        partners = []
        for v in chosen:
            row = self.nns[v][self.nns[v] >= 0]
            partners.append(int(row[g.integers(len(row))]))
        a = [self.views[int(v)][1] for v in chosen]
        b = [self.views[p][1] for p in partners]
        for v, x in zip(list(chosen) + partners, a + b):
            if isinstance(x, str):  # a file that became unreadable since the neighbour features were taken
                raise ImageReadError(self.views.records[int(v) // self.views.per].path,
                                     f"{x}; it was readable when knn/ was computed (delete knn/ to recompute)")
        return step, np.stack(a), np.stack(b)


def train_stego(c, records: Sequence[ImageRecord], progress: bool = True) -> Dict[str, Any]:
    """Train the head (resuming from ``train/checkpoint.pth``), fit the cluster probe, write ``stego_final.pth``.

    Returns:
        ``{"steps", "loss" (last logged), "clusters"}``.
    """
    from tqdm import tqdm

    from cutler.engine.events import MetricsWriter

    out = Path(c.out_dir)
    final = out / "stego_final.pth"
    if final.is_file():
        return {"steps": int(torch_load_weights_only(final)["step"]), "resumed": True}
    device = _device(c)
    extractor = _extractor(c, device)
    nns = compute_neighbours(c, records, progress, extractor)
    torch.manual_seed(int(c.seed))
    head = StegoHead(extractor.vit.embed_dim, int(c.dim), float(c.dropout)).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=float(c.lr))
    ckpt_path = out / "train" / "checkpoint.pth"
    start = 0
    if ckpt_path.is_file():
        ckpt = torch_load_weights_only(ckpt_path)
        head.load_state_dict(ckpt["head"])
        opt.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["step"])
        logger.info("stego: resuming at step %d from %s", start, ckpt_path)
    writer = MetricsWriter(out / "train", start_iter=start)
    weights = PairWeights.from_config(c)
    data = _PairBatches(records, nns, c)
    loader = torch.utils.data.DataLoader(data, sampler=range(start, int(c.max_steps)), batch_size=None,
                                         num_workers=int(c.num_workers))
    head.train()
    last: Dict[str, float] = {}
    for step, views, partners in tqdm(loader, total=int(c.max_steps) - start, desc="stego train", disable=not progress):
        g = _generator(c.seed, step, 1)
        torch.manual_seed(int(c.seed) * 1_000_003 + int(step))  # dropout masks
        with torch.no_grad():
            f = dino_patch_tokens(extractor, _to_batch(views, device))
            fk = dino_patch_tokens(extractor, _to_batch(partners, device))
        signal, signal_k = head.dropout(f), head.dropout(fk)  # STEGO correlates dropped-out features too
        losses = stego_pair_losses(signal, signal_k, head(f), head(fk), weights, g)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        done = int(step) + 1
        if done % int(c.log_period) == 0 or done == int(c.max_steps):
            last = {k: float(v.detach()) for k, v in losses.items()}
            writer.write(done, last)
        if done % int(c.checkpoint_period) == 0 or done == int(c.max_steps):
            atomic_torch_save({"head": head.state_dict(), "optimizer": opt.state_dict(), "step": done}, ckpt_path)
    head.eval()
    centroids = fit_probe(c, records, head, extractor, device)
    atomic_torch_save({"head": head.state_dict(), "centroids": torch.from_numpy(centroids),
                       "in_dim": int(extractor.vit.embed_dim), "dim": int(c.dim), "step": int(c.max_steps)}, final)
    return {"steps": int(c.max_steps), **{k: round(v, 5) for k, v in last.items()}, "clusters": int(len(centroids))}


@torch.no_grad()
def fit_probe(c, records: Sequence[ImageRecord], head: StegoHead, extractor, device: torch.device) -> np.ndarray:
    """Spherical k-means centroids ``(S, dim)`` from the codes of sampled pixels of up to ``probe_images`` views."""
    dataset = _Views(records, c)
    g = np.random.default_rng([int(c.seed), 7])
    chosen = g.permutation(len(dataset))[: int(c.probe_images)]
    codes = []
    for i in range(0, len(chosen), int(c.batch_size)):
        items = [dataset[int(v)] for v in chosen[i:i + int(c.batch_size)]]
        imgs = [img for _, img in items if not isinstance(img, str)]
        if not imgs:
            continue
        code = head(dino_patch_tokens(extractor, _to_batch(imgs, device)))
        flat = code.permute(0, 2, 3, 1).reshape(len(imgs), -1, code.shape[1]).cpu().numpy()
        take = min(int(c.probe_pixels_per_image), flat.shape[1])
        for x in flat:
            codes.append(x[g.choice(flat.shape[1], take, replace=False)])
    return fit_cluster_probe(np.concatenate(codes), int(c.num_clusters), int(c.seed), int(c.probe_iters))


# ----------------------------------------------------------------------------------------- inference
class StegoSegmenter:
    """A trained head + cluster probe on a DINO ViT: ``labels(images)`` gives the stuff cluster per pixel."""

    def __init__(self, c, device: Optional[torch.device] = None):
        self.c = c
        self.device = device or _device(c)
        path = Path(c.out_dir) / "stego_final.pth"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: train STEGO first (tools/stego.py train)")
        state = torch_load_weights_only(path)
        self.extractor = _extractor(c, self.device)
        if int(state["in_dim"]) != self.extractor.vit.embed_dim:
            raise ValueError(f"{path} was trained on {state['in_dim']}-d features, stego.vit_arch gives "
                             f"{self.extractor.vit.embed_dim}")
        self.head = StegoHead(int(state["in_dim"]), int(state["dim"])).to(self.device).eval()
        self.head.load_state_dict(state["head"])
        self.centroids = state["centroids"].to(self.device)
        mode = c.crf
        if mode == "auto":
            mode = "torch" if self.device.type == "cuda" else "pydensecrf"
        self.crf_mode = mode

    @torch.no_grad()
    def code(self, resized: torch.Tensor) -> torch.Tensor:
        """``(B, dim, h, w)`` code of ``(B, 3, S, S)`` uint8 images (averaged with the mirrored image's)."""
        code = self.head(dino_patch_tokens(self.extractor, resized))
        if self.c.flip:
            code = (code + self.head(dino_patch_tokens(self.extractor, resized.flip(-1))).flip(-1)) / 2
        return code

    @torch.no_grad()
    def labels(self, images: Sequence[np.ndarray], resized: Sequence[np.ndarray]) -> torch.Tensor:
        """``(B, S, S)`` int64 cluster index (0..K-1) per pixel of the ``S x S`` images (CRF at that size)."""
        x = _to_batch(resized, self.device)
        code = self.code(x)
        size = images[0].shape[:2]
        code = F.interpolate(code, size=size, mode="bilinear", align_corners=False)
        log_probs = cluster_log_probs(code, self.centroids, float(self.c.alpha))
        imgs = torch.from_numpy(np.stack(images)).to(self.device)
        return crf_refine(imgs, log_probs, mode=self.crf_mode)


def label_path(out_dir: os.PathLike | str, file_name: str) -> Path:
    """Where the stuff labels of image ``file_name`` (relative to its dataset root) are written."""
    return Path(out_dir) / "labels" / (os.path.splitext(file_name)[0] + ".png")


def infer_stego(c, records: Sequence[ImageRecord], shard_index: int = 0, num_shards: int = 1,
                progress: bool = True, segmenter: Optional[StegoSegmenter] = None) -> Dict[str, Any]:
    """Stuff labels for this shard's images (``records[shard_index::num_shards]``); images whose PNG exists
    are skipped, unreadable ones recorded in the shard's ``failures.jsonl``. Returns the shard summary."""
    from tqdm import tqdm

    from cutler.maskcut.writer import read_failures, shard_dir_name

    t0 = time.perf_counter()
    out = Path(c.out_dir)
    shard = out / "shards" / shard_dir_name(shard_index, num_shards)
    shard.mkdir(parents=True, exist_ok=True)
    failed_before = {r["file_name"] for r in read_failures(shard / "failures.jsonl")}
    mine = list(records)[shard_index::num_shards]
    todo = [r for r in mine if r.file_name not in failed_before and not label_path(out, r.file_name).is_file()]
    seg = segmenter or StegoSegmenter(c)
    side = int(c.infer_size)
    vit_side = max(c.patch_size, side // c.patch_size * c.patch_size)
    loader = torch.utils.data.DataLoader(MaskCutImages(todo, vit_side, c.patch_size), batch_size=int(c.infer_batch_size),
                                         num_workers=int(c.num_workers), collate_fn=collate_items)
    done = failed = 0
    with open(shard / "failures.jsonl", "a", encoding="utf-8") as fail_log:
        for batch in tqdm(loader, total=(len(todo) + int(c.infer_batch_size) - 1) // int(c.infer_batch_size),
                          desc=f"stego {shard_index}/{num_shards}", disable=not progress):
            good = [it for it in batch if "error" not in it]
            for it in batch:
                if "error" in it:
                    fail_log.write(json.dumps({"id": it["record"].id, "file_name": it["record"].file_name,
                                               "reason": it["error"]}) + "\n")
                    fail_log.flush()
                    failed += 1
            if not good:
                continue
            labels = seg.labels([it["image"] for it in good], [it["resized"] for it in good]).cpu().numpy()
            for it, lab in zip(good, labels):
                full = Image.fromarray((lab + 1).astype(np.uint8)).resize((it["width"], it["height"]), Image.NEAREST)
                buf = _png_bytes(full)
                atomic_write_bytes(label_path(out, it["record"].file_name), buf)
                done += 1
    summary = {"shard_index": shard_index, "num_shards": num_shards, "images_in_shard": len(mine),
               "skipped_already_done": len(mine) - len(todo), "processed": done, "failed": failed,
               "crf": seg.crf_mode, "device": str(seg.device), "wall_s": time.perf_counter() - t0}
    atomic_write_json(shard / "summary.json", summary, indent=2)
    return summary


def _png_bytes(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


__all__ = ["StegoSegmenter", "compute_neighbours", "crop_boxes", "fit_probe", "infer_stego", "label_path",
           "load_view", "train_stego"]
