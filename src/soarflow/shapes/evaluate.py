"""One ShapesEval evaluation of a model at one sampler setting, shared by `soarflow demo` and `soarflow study`.

Per setting (``num_steps``, ``guidance_scale``): sample one image per prompt (image i's noise fixed by (seed, i), so two
models evaluated with the same seed see the same noise), score them (per-image pass/fail and reward), the
Frechet distance and per-prompt diversity against / beside real renders of the same prompts, and the
exposure-bias gap on an evenly strided subset of the real renders (so every family is represented).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .generate import DEFAULT_SHIFT, encode_captions, generate_images, null_caption
from .metrics import diversity_per_group, exposure_bias, frechet_distance
from .scorer import ShapesReport, score


def evaluate_setting(
    model: torch.nn.Module,
    prompts: Sequence[str],
    groups: Sequence[int],
    real: torch.Tensor,
    *,
    num_steps: int,
    guidance_scale: float,
    seed: int,
    exposure_images: int,
    shift: float | None = None,
) -> tuple[dict, torch.Tensor, ShapesReport]:
    """(metrics, images, report): metrics holds ``shapes_eval`` (summary), ``frechet_distance``, ``diversity`` (and
    ``diversity_per_group``: {group id: diversity}, whose mean it is) and ``exposure_bias``; `report` keeps the
    per-image records. `real` are renders of `prompts` (same order)."""
    shift = DEFAULT_SHIFT if shift is None else shift
    images = generate_images(
        model, list(prompts), num_steps=num_steps, guidance_scale=guidance_scale, shift=shift, seed=seed
    )
    report = score(images, list(prompts))
    k = min(exposure_images, real.shape[0])
    idx = torch.linspace(0, real.shape[0] - 1, k).round().long().unique()
    device = next(model.parameters()).device  # the model's (CPU or GPU); the noise is drawn on the CPU either way
    eb = exposure_bias(
        model,
        real[idx].to(device),
        encode_captions([prompts[i] for i in idx], device),
        null_cond=null_caption(len(idx), device),
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        shift=shift,
        generator=torch.Generator().manual_seed(seed),
    )
    per_group = diversity_per_group(images, list(groups))
    metrics = {
        "shapes_eval": report.to_dict(),
        "frechet_distance": float(frechet_distance(images, real)),
        "diversity": float(sum(per_group.values()) / len(per_group)),
        "diversity_per_group": per_group,
        "exposure_bias": eb.to_dict(),
    }
    return metrics, images, report
