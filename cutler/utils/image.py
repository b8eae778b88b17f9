"""Robust image decoding shared by MaskCut, training, evaluation and demos.

Every odd image a real dataset contains is turned into an ``H x W x 3`` uint8 RGB array, oriented as
its EXIF tag says: grayscale, palette, RGBA/LA (alpha dropped, as PIL's ``convert("RGB")`` does), CMYK, 16-bit and float
images.
What cannot be decoded raises :class:`ImageReadError` naming the file and the reason, so callers can
record it and carry on.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".JPEG")


class ImageReadError(RuntimeError):
    """An image that cannot be used; ``path`` and ``reason`` are kept for failure reports."""

    def __init__(self, path: os.PathLike | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _to_uint8_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr = np.clip((arr - lo) * scale, 0, 255).round().astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    # Alpha is dropped, not composited: PIL's convert("RGB") is what the published MaskCut script and
    # Detectron2's reader do, so transparent pixels keep their stored colour here too.
    return np.asarray(img.convert("RGB"))


def read_image_rgb(path: os.PathLike | str, min_size: int = 1) -> np.ndarray:
    """Decode ``path`` to an ``(H, W, 3)`` uint8 RGB array, EXIF orientation applied.

    Args:
        path: image file.
        min_size: smallest accepted side in pixels.

    Raises:
        ImageReadError: missing, empty, corrupt, truncated, non-image, or smaller than ``min_size``.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()  # forces the full decode: truncated files fail here, not later
            arr = _to_uint8_rgb(img)
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image (unidentified format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(path, f"corrupt or truncated image ({e})") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"image too large ({e})") from None
    if arr.ndim != 3 or arr.shape[0] < min_size or arr.shape[1] < min_size:
        raise ImageReadError(path, f"image too small ({arr.shape[1]}x{arr.shape[0]} px, need >= {min_size})")
    return np.ascontiguousarray(arr)


def image_size(path: os.PathLike | str) -> tuple[int, int]:
    """``(width, height)`` after EXIF orientation, read from the header only."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError) as e:
        raise ImageReadError(path, f"cannot read image header ({e})") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def list_images(root: os.PathLike | str) -> list[str]:
    """All image files below ``root`` (recursive), as sorted paths relative to ``root``."""
    root = Path(root)
    exts = {e.lower() for e in IMAGE_EXTENSIONS}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if os.path.splitext(name)[1].lower() in exts:
                out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)
