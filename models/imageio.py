"""Image files out: sample grids as PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def to_uint8(x: np.ndarray, levels: int) -> np.ndarray:
    """Map integer levels ``0..L−1`` to ``0..255``."""
    return np.clip(np.round(x.astype(np.float64) * 255.0 / max(levels - 1, 1)), 0, 255).astype(np.uint8)


def grid(images: np.ndarray, levels: int, pad: int = 1) -> np.ndarray:
    """``(N, C, H, W)`` levels -> one ``(rows·(H+pad), cols·(W+pad), C)`` uint8 mosaic."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    imgs = to_uint8(images, levels).transpose(0, 2, 3, 1)
    for i, img in enumerate(imgs):
        r, k = divmod(i, cols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = img
    return out


def save_grid(images: np.ndarray, levels: int, path: str | Path, scale: int = 4) -> None:
    """Write a PNG mosaic, upscaled ``scale``× with nearest neighbour for small images."""
    from PIL import Image

    g = grid(images, levels)
    img = Image.fromarray(g[..., 0] if g.shape[2] == 1 else g)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path, format="PNG")


def png_bytes(images: np.ndarray, levels: int) -> bytes:
    """A PNG mosaic as bytes."""
    import io

    buf = io.BytesIO()
    save_grid(images, levels, buf)  # type: ignore[arg-type]
    return buf.getvalue()
