"""DINO ViT patch features for MaskCut: timm backbones, checkpoint loading, last-block q/k/v.

The forward runs the patch embedding, adds DINO-resampled position embeddings, runs blocks ``0..L-2``
and stops inside the last block right after ``norm1 -> attn.qkv``: nothing past the last qkv projection
is computed (MaskCut never uses it).
"""
from __future__ import annotations

import math
import os
import warnings
from contextlib import nullcontext
from functools import partial
from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils.logging import get_logger

logger = get_logger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (embed_dim, num_heads) per published DINO architecture name
ARCHS = {"small": (384, 6), "base": (768, 12)}
FEATURE_KINDS = ("k", "q", "v", "kqv")
_WRAPPER_KEYS = ("teacher", "student", "model", "state_dict")
_PREFIXES = ("module.", "backbone.")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose keys or shapes do not match the requested ViT."""


def build_vit(arch: str = "base", patch_size: int = 8) -> nn.Module:
    """A timm ``VisionTransformer`` with DINO's layout (depth 12, qkv bias, LayerNorm eps 1e-6, no head).

    Args:
        arch: ``"small"`` (ViT-S, 384-d, 6 heads) or ``"base"`` (ViT-B, 768-d, 12 heads).
        patch_size: 8 or 16.
    """
    from timm.models.vision_transformer import VisionTransformer

    if arch not in ARCHS:
        raise ValueError(f"unknown vit_arch '{arch}', expected one of {sorted(ARCHS)}")
    if patch_size not in (8, 16):
        raise ValueError(f"patch_size must be 8 or 16 (DINO checkpoints), got {patch_size}")
    dim, heads = ARCHS[arch]
    return VisionTransformer(img_size=224, patch_size=patch_size, embed_dim=dim, depth=12, num_heads=heads,
                             mlp_ratio=4.0, qkv_bias=True, num_classes=0,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6))


def extract_state_dict(obj: Mapping) -> dict:
    """The backbone state dict inside a DINO checkpoint object.

    Accepts a plain state dict or one wrapped under ``teacher``/``student``/``model``/``state_dict``;
    strips ``module.`` and ``backbone.`` prefixes. When some keys carry ``backbone.``, the others
    (e.g. DINO's projection ``head.*``) are not part of the ViT and are dropped.
    """
    sd = obj
    for _ in range(3):  # wrappers can nest ({"model": {"state_dict": ...}})
        if not isinstance(sd, Mapping):
            break
        inner = next((sd[k] for k in _WRAPPER_KEYS if k in sd and isinstance(sd[k], Mapping)), None)
        if inner is None or any(torch.is_tensor(v) for v in sd.values()):
            break
        sd = inner
    if not isinstance(sd, Mapping) or not any(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointMismatchError("checkpoint holds no tensor state dict (looked under "
                                      f"{', '.join(_WRAPPER_KEYS)})")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items() if torch.is_tensor(v)}
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def load_dino_checkpoint(model: nn.Module, path: str) -> None:
    """Load DINO weights from a local file into ``model`` with a strict key and shape check.

    Raises:
        FileNotFoundError: ``path`` does not exist (nothing is ever downloaded).
        CheckpointMismatchError: missing/unexpected keys or shape mismatches, listed in the message.
    """
    if "://" in str(path):
        raise FileNotFoundError(f"pretrain_path must be a local file, got URL '{path}' (no downloads)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DINO checkpoint not found: {path}")
    sd = extract_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(sd) & set(own)) if k != "pos_embed" and sd[k].shape != own[k].shape]
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape[-1] != own["pos_embed"].shape[-1]:
        shapes.append(f"pos_embed: checkpoint {tuple(sd['pos_embed'].shape)} vs model {tuple(own['pos_embed'].shape)}")
    if missing or unexpected or shapes:
        def short(keys):
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")
        parts = [f"checkpoint {path} does not match the ViT"]
        if missing:
            parts.append(f"missing keys: {short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {short(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {short(shapes)}")
        parts.append("check --vit-arch / --patch-size against the checkpoint")
        raise CheckpointMismatchError("; ".join(parts))
    if sd["pos_embed"].shape != own["pos_embed"].shape:
        # a checkpoint trained at another resolution: keep its grid, resampled at run time like DINO
        model.pos_embed = nn.Parameter(torch.zeros_like(sd["pos_embed"]))
    model.load_state_dict(sd, strict=True)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """DINO's position-embedding resampling.

    Args:
        pos_embed: ``(1, 1 + N, C)`` with a square ``sqrt(N) x sqrt(N)`` patch grid.
        grid_h, grid_w: target patch grid.

    Returns:
        ``(1, 1 + grid_h * grid_w, C)``. The grid is resampled with bicubic ``interpolate`` using
        ``scale_factor=((grid_h + 0.1) / sqrt(N), (grid_w + 0.1) / sqrt(N))`` (not an explicit size:
        the two differ numerically and DINO features depend on it).
    """
    n = pos_embed.shape[1] - 1
    side = int(math.sqrt(n))
    if side * side != n:
        raise ValueError(f"pos_embed grid is not square ({n} patches)")
    if grid_h == side and grid_w == side:
        return pos_embed
    cls_pe, patch_pe = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    grid = patch_pe.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side), mode="bicubic")
    if grid.shape[-2:] != (grid_h, grid_w):
        raise RuntimeError(f"pos_embed resampling produced {tuple(grid.shape[-2:])}, expected {(grid_h, grid_w)}")
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat([cls_pe, grid], dim=1)


AMP_DTYPES = ("auto", "bfloat16", "float16", "float32")


def _autocast_context(device: torch.device, dtype: str):
    """Autocast for the ViT forward: ``auto`` = bf16 (fp16 without bf16 support) on CUDA and float32 elsewhere;
    an explicit ``bfloat16``/``float16`` also applies on CPU (to use bf16 CPUs, or to measure the effect of
    reduced precision on the masks without a GPU)."""
    if dtype not in AMP_DTYPES:
        raise ValueError(f"unknown ViT dtype '{dtype}', expected one of {AMP_DTYPES}")
    if dtype == "float32" or (dtype == "auto" and device.type != "cuda"):
        return nullcontext()
    if dtype == "auto":
        dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dt = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return torch.autocast(device.type, dtype=dt)


class DinoFeatureExtractor(nn.Module):
    """Last-block q/k/v patch features of a DINO ViT, batched.

    Args:
        arch: ``"small"`` | ``"base"``.
        patch_size: 8 | 16.
        feat: ``"k"`` | ``"q"`` | ``"v"`` | ``"kqv"`` (concatenation k, q, v).
        pretrain_path: local DINO checkpoint; empty -> random init with a loud warning.
        amp_dtype: autocast dtype: ``"auto"`` (on GPU bf16 if supported else fp16; float32 on CPU) |
            ``"bfloat16"`` | ``"float16"`` (on any device) | ``"float32"`` (no autocast).
        random_init_warning: what the random-init warning says after "ViT-B/8 has RANDOM weights".
        match_dino: run the forward the way DINO's own code does, so that float32 features equal it bit
            for bit: a contiguous NCHW input to the patch convolution and the explicit
            ``softmax(q k^T * scale) v`` attention (head dim 64: the scale 1/8 is exact applied before or
            after the product). Otherwise (faster, less memory) ``scaled_dot_product_attention`` and the
            input's own layout are used, which round differently (~1e-6).
    """

    def __init__(self, arch: str = "base", patch_size: int = 8, feat: str = "k", pretrain_path: str = "",
                 amp_dtype: str = "auto", random_init_warning: str = "for MaskCut (no pretrain_path given): the masks are "
                 "meaningless except for tests and demos; pass --pretrain_path DINO.pth", match_dino: bool = False):
        super().__init__()
        if feat not in FEATURE_KINDS:
            raise ValueError(f"unknown vit_feat '{feat}', expected one of {FEATURE_KINDS}")
        self.vit = build_vit(arch, patch_size)
        self.match_dino = match_dino
        self.patch_size = patch_size
        self.feat = feat
        self.amp_dtype = amp_dtype
        self.random_init = not pretrain_path
        if pretrain_path:
            load_dino_checkpoint(self.vit, pretrain_path)
            logger.info("loaded DINO ViT-%s/%d weights from %s", arch[0].upper(), patch_size, pretrain_path)
        else:
            msg = f"ViT-{arch[0].upper()}/{patch_size} has RANDOM weights {random_init_warning}"
            warnings.warn(msg, stacklevel=2)
            logger.warning("!" * 20 + " " + msg + " " + "!" * 20)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()
        self.requires_grad_(False)

    @property
    def match_dino(self) -> bool:
        return self._match_dino

    @match_dino.setter
    def match_dino(self, value: bool) -> None:
        self._match_dino = bool(value)
        for blk in self.vit.blocks:
            blk.attn.fused_attn = not self._match_dino

    @property
    def feat_dim(self) -> int:
        dim = self.vit.embed_dim
        return 3 * dim if self.feat == "kqv" else dim

    def embed_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The input of the first block: ``(B, 1 + h * w, dim)`` CLS + patch tokens with DINO-resampled
        position embeddings, for images as :meth:`forward` takes them (call under the autocast context)."""
        b, _, H, W = images.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        x = images.float()
        if self.match_dino:
            x = x.contiguous()  # a channels-last input (decoded HWC arrays) picks another convolution kernel
        if images.dtype == torch.uint8:
            x = x / 255.0
        x = (x - self.mean) / self.std
        vit = self.vit
        tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, hw, C)
        tokens = vit.patch_embed.norm(tokens)
        cls = vit.cls_token.expand(b, -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        tokens = tokens + interpolate_pos_embed(vit.pos_embed, H // p, W // p)
        return vit.norm_pre(tokens)

    @torch.no_grad()
    def cls_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, dim)`` float32 CLS token after the last block and the final LayerNorm (DINO's image feature),
        for images as :meth:`forward` takes them."""
        vit = self.vit
        with _autocast_context(images.device, self.amp_dtype):
            tokens = self.embed_tokens(images)
            for blk in vit.blocks:
                tokens = blk(tokens)
            return vit.norm(tokens)[:, 0].float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features.

        Args:
            images: ``(B, 3, H, W)`` uint8 RGB (normalized here) or float in [0, 1]; H, W multiples of
                the patch size.

        Returns:
            ``(B, h * w, C)`` float32 features of the patch tokens (CLS dropped), row-major over the
            ``h x w = H/p x W/p`` grid; C = embed dim (``3 * dim`` for ``kqv``).
        """
        b = images.shape[0]
        vit = self.vit
        with _autocast_context(images.device, self.amp_dtype):
            tokens = self.embed_tokens(images)
            for blk in vit.blocks[:-1]:
                tokens = blk(tokens)
            last = vit.blocks[-1]
            qkv = last.attn.qkv(last.norm1(tokens))  # (B, 1 + hw, 3C): the forward stops here
        n, c3 = qkv.shape[1], qkv.shape[2]
        heads = last.attn.num_heads
        # timm/DINO layout: (3, heads, head_dim) along the channel axis; heads concatenate back to C
        qkv = qkv.float().reshape(b, n, 3, heads, c3 // 3 // heads)
        q, k, v = (qkv[:, 1:, i].reshape(b, n - 1, c3 // 3) for i in range(3))
        if self.feat == "k":
            return k
        if self.feat == "q":
            return q
        if self.feat == "v":
            return v
        return torch.cat([k, q, v], dim=-1)
