"""Turn model outputs in [-1, 1] into viewable PNG grids, optionally with a caption under each image."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


MARK_PASS, MARK_FAIL = (0, 170, 0), (220, 0, 0)


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
    marks: Sequence[bool] | None = None,
) -> Image.Image:
    """A PIL grid of `images`; small images are upscaled (nearest) so a caption fits under each one.

    With `marks` (e.g. the scorer's pass/fail per image) each image gets a green (True) or red (False) border and
    a legend line is added at the top."""
    arr = to_uint8(images)
    b, h, w, _ = arr.shape
    if captions is not None and len(captions) != b:
        raise ValueError(f"got {len(captions)} captions for {b} images")
    if marks is not None and len(marks) != b:
        raise ValueError(f"got {len(marks)} marks for {b} images")
    if scale is None:
        scale = max(1, 96 // max(h, w))
    cell_w, cell_h = w * scale, h * scale
    font = ImageFont.load_default()
    wrap = max(8, cell_w // 6)
    lines = [textwrap.wrap(c, wrap)[:4] if captions else [] for c in (captions or [""] * b)]
    text_h = 11 * max((len(x) for x in lines), default=0)
    ncol = max(1, min(ncol, b))
    nrow = (b + ncol - 1) // ncol
    if marks is not None:
        pad = max(pad, 4)  # room for the border
    legend_h = 14 if marks is not None else 0
    sheet = Image.new(
        "RGB", (ncol * (cell_w + pad) + pad, legend_h + nrow * (cell_h + text_h + pad) + pad), (255, 255, 255)
    )
    draw = ImageDraw.Draw(sheet)
    if marks is not None:
        draw.text(
            (pad, 2),
            f"border: green = scorer pass ({sum(map(bool, marks))}), red = fail ({b - sum(map(bool, marks))})",
            fill=(0, 0, 0),
            font=font,
        )
    for i in range(b):
        r, c = divmod(i, ncol)
        x0, y0 = pad + c * (cell_w + pad), legend_h + pad + r * (cell_h + text_h + pad)
        if marks is not None:
            color = MARK_PASS if marks[i] else MARK_FAIL
            draw.rectangle((x0 - 3, y0 - 3, x0 + cell_w + 2, y0 + cell_h + 2), outline=color, width=3)
        sheet.paste(Image.fromarray(arr[i]).resize((cell_w, cell_h), Image.NEAREST), (x0, y0))
        for j, line in enumerate(lines[i]):
            draw.text((x0, y0 + cell_h + 11 * j), line, fill=(0, 0, 0), font=font)
    return sheet


def save_image_grid(
    images: torch.Tensor,
    captions: Sequence[str] | None,
    path: str | Path,
    ncol: int = 8,
    marks: Sequence[bool] | None = None,
) -> Path:
    """Write `make_grid(images, captions, ncol, marks=marks)` as a PNG (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, captions, ncol=ncol, marks=marks).save(path)
    return path
