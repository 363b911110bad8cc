"""Turn model outputs in [-1, 1] into viewable PNG grids, optionally with a caption under each image."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8. Values outside the range are clipped."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(
    images: torch.Tensor,
    captions: Sequence[str] | None = None,
    ncol: int = 8,
    scale: int | None = None,
    pad: int = 2,
) -> Image.Image:
    """A PIL grid of `images`; small images are upscaled (nearest) so a caption fits under each one."""
    arr = to_uint8(images)
    b, h, w, _ = arr.shape
    if captions is not None and len(captions) != b:
        raise ValueError(f"got {len(captions)} captions for {b} images")
    if scale is None:
        scale = max(1, 96 // max(h, w))
    cell_w, cell_h = w * scale, h * scale
    font = ImageFont.load_default()
    wrap = max(8, cell_w // 6)
    lines = [textwrap.wrap(c, wrap)[:4] if captions else [] for c in (captions or [""] * b)]
    text_h = 11 * max((len(x) for x in lines), default=0)
    ncol = max(1, min(ncol, b))
    nrow = (b + ncol - 1) // ncol
    sheet = Image.new("RGB", (ncol * (cell_w + pad) + pad, nrow * (cell_h + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i in range(b):
        r, c = divmod(i, ncol)
        x0, y0 = pad + c * (cell_w + pad), pad + r * (cell_h + text_h + pad)
        sheet.paste(Image.fromarray(arr[i]).resize((cell_w, cell_h), Image.NEAREST), (x0, y0))
        for j, line in enumerate(lines[i]):
            draw.text((x0, y0 + cell_h + 11 * j), line, fill=(0, 0, 0), font=font)
    return sheet


def save_image_grid(
    images: torch.Tensor, captions: Sequence[str] | None, path: str | Path, ncol: int = 8
) -> Path:
    """Write `make_grid(images, captions, ncol)` as a PNG (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, captions, ncol=ncol).save(path)
    return path
