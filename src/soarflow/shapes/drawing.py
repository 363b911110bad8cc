"""Drawing scenes as uint8 images, and `render`: real images for evaluation prompts."""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch

from .grammar import parse_prompt
from .scenes import Scene, SceneObject, scene_for_spec


def draw_scene(scene: Scene) -> np.ndarray:
    """uint8 image (H, W, 3). Pixels are filled where their centre lies inside the shape."""
    s = scene.image_size
    img = np.empty((s, s, 3), dtype=np.uint8)
    img[:] = scene.background
    for o in scene.objects:
        n = o.size
        c = (np.arange(n) + 0.5) - n / 2  # pixel-centre offsets from the box centre
        if o.shape == "square":
            mask = np.ones((n, n), dtype=bool)
        elif o.shape == "circle":
            mask = c[:, None] ** 2 + c[None, :] ** 2 <= (n / 2) ** 2
        else:  # upright isosceles triangle: apex at the top centre, base = bottom edge
            half_width = (np.arange(n) + 0.5) / 2
            mask = np.abs(c[None, :]) <= half_width[:, None]
        img[o.y0 : o.y0 + n, o.x0 : o.x0 + n][mask] = o.rgb
    return img


def draw_scene_antialiased(scene: Scene, rng: random.Random, factor: int = 4, max_shift: float = 0.5) -> np.ndarray:
    """uint8 image (H, W, 3) with soft edges, like a generator's: each object is moved by a random sub-pixel
    offset in [-max_shift, max_shift) px (in steps of 1/factor), drawn at `factor` x resolution with the
    pixel-centre rule and box-filtered back down. Tests the scorer on the edges that generated images have."""
    s, f = scene.image_size, factor
    big = []
    for o in scene.objects:
        dx, dy = (round((rng.random() * 2 - 1) * max_shift * f) for _ in range(2))
        x0 = min(max(o.x0 * f + dx, 0), (s - o.size) * f)
        y0 = min(max(o.y0 * f + dy, 0), (s - o.size) * f)
        big.append(SceneObject(o.shape, o.color, x0, y0, o.size * f, o.rgb))
    hi = draw_scene(Scene(tuple(big), scene.background, s * f)).astype(np.float64)
    return np.round(hi.reshape(s, f, s, f, 3).mean(axis=(1, 3))).astype(np.uint8)


def to_tensor(images_uint8: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) or (H, W, 3) uint8 -> float32 (B, 3, H, W) / (3, H, W) in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(images_uint8)).float().div(127.5).sub(1.0)
    return t.permute(0, 3, 1, 2).contiguous() if t.ndim == 4 else t.permute(2, 0, 1).contiguous()


def render(prompts: Sequence[str], seed: int = 0, size: int = 32) -> torch.Tensor:
    """Real images for evaluation-grammar prompts: (B, 3, size, size) float32 in [-1, 1].

    Image b depends only on (prompts[b], b, seed, size). Held-out combinations are allowed here."""
    if isinstance(prompts, str):
        raise ValueError(f"render expects a sequence of prompts, got the single string {prompts!r}")
    if size < 24:
        raise ValueError(f"size must be >= 24 pixels for classifiable shapes, got {size}")
    imgs = np.empty((len(prompts), size, size, 3), dtype=np.uint8)
    for b, p in enumerate(prompts):
        spec = parse_prompt(p)
        rng = random.Random(f"render:{seed}:{b}:{spec.text}")
        imgs[b] = draw_scene(scene_for_spec(spec, rng, size, allow_held_out=True))
    return to_tensor(imgs)
