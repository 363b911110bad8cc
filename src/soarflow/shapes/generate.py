"""Run a text-to-image velocity model on ShapesEval captions: captions -> tokens (the condition), the empty
caption (the null condition) and `generate_images` (Euler sampler with classifier-free guidance).

The model is any embedded ShapesEval model: ``model(x, sigma, {"tokens": ...}) -> v`` with a ``config`` holding
``in_channels``, ``image_size`` and ``max_tokens``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..sampling import sample_euler
from .grammar import MAX_TOKENS, tokenize

# Sampler settings shared by validation grids, the demo and `eval-shapes --checkpoint` unless overridden.
DEFAULT_SHIFT = 1.0  # pixel-space 32x32: no resolution shift
GUIDANCE_SCALE = 4.0  # the shapes models' default guidance scale (the base's evaluation, the demo, validation)


def encode_captions(captions: Sequence[str], device: torch.device | str = "cpu", max_tokens: int | None = None) -> dict:
    return {"tokens": tokenize(list(captions), max_len=max_tokens or MAX_TOKENS).to(device)}


def null_caption(batch_size: int, device: torch.device | str = "cpu", max_tokens: int | None = None) -> dict:
    return {"tokens": torch.zeros(batch_size, max_tokens or MAX_TOKENS, dtype=torch.long, device=device)}


@torch.no_grad()
def generate_images(
    model: nn.Module,
    prompts: Sequence[str],
    *,
    num_steps: int = 40,
    guidance_scale: float = GUIDANCE_SCALE,
    shift: float = DEFAULT_SHIFT,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sample one image per prompt, (B, 3, H, W) in [-1, 1]. Image i's noise depends only on (seed, i), so
    results do not change with batch_size and two models given the same seed start from the same noise."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    arch = model.config  # UNetConfig or MMDiTConfig: image_size, in_channels, max_tokens
    shape = (arch.in_channels, arch.image_size, arch.image_size)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            noise = torch.stack(
                [
                    torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + start + j))
                    for j in range(len(chunk))
                ]
            ).to(device)
            cond = encode_captions(chunk, device, arch.max_tokens)
            x = sample_euler(
                model,
                noise,
                cond,
                null_cond=null_caption(len(chunk), device, arch.max_tokens),
                num_steps=num_steps,
                guidance_scale=guidance_scale,
                shift=shift,
            )
            out.append(x.clamp(-1, 1).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, *shape)
