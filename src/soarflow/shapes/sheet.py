"""Sample sheets: PNG grids of images with their captions (for people to look at the world and at model outputs)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..utils.images import save_image_grid
from .scorer import validate_images


def save_sample_sheet(images: torch.Tensor, captions: Sequence[str], path: str | Path, ncol: int = 8) -> Path:
    """Write (B, 3, H, W) images in [-1, 1] as a PNG grid with each caption under its image.

    Refuses to overwrite an existing file (FileExistsError naming it)."""
    images = validate_images(images)
    if len(captions) != images.shape[0]:
        raise ValueError(f"got {len(captions)} captions for {images.shape[0]} images")
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; not overwriting it")
    return save_image_grid(images, list(captions), path, ncol=ncol)
