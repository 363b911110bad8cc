r"""Image conventions shared by the scorers.

Every scorer takes ``images``: a float tensor (B, 3, H, W) **in [-1, 1]** (what the samplers and VAEs give) and
``prompts``: a list of B strings, and returns a float tensor (B,) on the CPU, higher is better.

CLIP-family input: :math:`x \in [0, 1]`, the shorter side resized to the tower's size (bicubic), a centre crop,
then :math:`(x - \mu) / \sigma` with the tower's mean and std. For square images this is the plain resize the
Flow-GRPO / DiffusionNFT scorers apply to tensors.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_batch(name: str, images: torch.Tensor, prompts: Sequence[str]) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name}: images must be (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
    if images.shape[0] != len(prompts):
        raise ValueError(f"{name}: {images.shape[0]} images but {len(prompts)} prompts")


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] (clamped)."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """[-1, 1] (B, 3, H, W) -> list of HxWx3 uint8 arrays (rounded as PIL saves them)."""
    x = (to_unit(images) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return list(x)


def clip_pixels(
    images: torch.Tensor, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> torch.Tensor:
    """[-1, 1] (B, 3, H, W) -> normalised CLIP input (B, 3, size, size): shorter side to `size`, centre crop."""
    x = to_unit(images)
    h, w = x.shape[-2:]
    s = size / min(h, w)
    x = F.interpolate(
        x, size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic", align_corners=False
    ).clamp(0, 1)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    sd = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / sd


def features(out) -> torch.Tensor:
    """transformers >= 5 may return a model output from get_*_features: take its pooled tensor."""
    return getattr(out, "pooler_output", out) if not isinstance(out, torch.Tensor) else out


# what to pip install for each package a scorer imports
PIP = {
    "open_clip": "'soarflow[eval]' (open-clip-torch)",
    "transformers": "'soarflow[diffusers]'",
    "mmdet": "mmdet (GenEval's environment: mmdet 2.x with mmcv-full)",
    "ImageReward": "image-reward",
    "easyocr": "easyocr",
    "paddleocr": "paddlepaddle paddleocr",
    "huggingface_hub": "huggingface_hub",
}


def missing_package(scorer: str, package: str) -> ImportError:
    """The one-line error for a scorer whose package is not installed."""
    return ImportError(f"scorer {scorer!r} needs the package {package!r}: pip install {PIP.get(package, package)}")


def missing_weights(scorer: str, what: str, path: object) -> FileNotFoundError:
    """The one-line error for a scorer whose weights are not where they were asked for."""
    return FileNotFoundError(f"scorer {scorer!r}: {what} not found: {path}")
