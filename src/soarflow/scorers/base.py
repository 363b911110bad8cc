"""The evaluation hook: generate images for a prompt set, score them with user scorers, summarise.

A *scorer* is any callable ``scorer(images, prompts) -> Tensor (B,)`` with images in [-1, 1], shape
(B, 3, H, W) — GenEval-style detectors, OCR accuracy, preference models (PickScore, HPS, ImageReward) or the
CLIPScore example in :mod:`soarflow.scorers.clip_score`. A *generator* is any callable
``generate(prompts) -> images``; for a trained task use :func:`task_generator`.

    scores = evaluate(task_generator(task, model, device, num_steps=40, guidance_scale=4.5),
                      prompts, {"clip": CLIPScorer.from_pretrained("/models/clip-vit-large")})
    scores["clip"]["mean"], scores["clip"]["per_prompt"]
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch


class Scorer(Protocol):
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """One score per image (higher is better), shape (B,)."""


Generator = Callable[[Sequence[str]], torch.Tensor]


def evaluate(
    generate: Generator,
    prompts: Sequence[str],
    scorers: Mapping[str, Scorer],
    *,
    batch_size: int = 8,
    images_per_prompt: int = 1,
) -> dict[str, dict[str, Any]]:
    """Generate `images_per_prompt` images for every prompt (in batches) and score them with every scorer.

    Returns ``{name: {"mean": float, "std": float, "per_prompt": [mean score of each prompt]}}``."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("evaluate: the prompt list is empty")
    if not scorers:
        raise ValueError("evaluate: no scorer given")
    expanded = [p for p in prompts for _ in range(images_per_prompt)]
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in scorers}
    for start in range(0, len(expanded), batch_size):
        chunk = expanded[start : start + batch_size]
        images = generate(chunk)
        if images.shape[0] != len(chunk):
            raise ValueError(f"evaluate: the generator returned {images.shape[0]} images for {len(chunk)} prompts")
        for name, scorer in scorers.items():
            s = torch.as_tensor(scorer(images, chunk)).float().reshape(-1).cpu()
            if s.shape[0] != len(chunk):
                raise ValueError(f"evaluate: scorer {name!r} returned {s.shape[0]} scores for {len(chunk)} images")
            scores[name].append(s)
    out = {}
    for name, parts in scores.items():
        s = torch.cat(parts)
        per_prompt = s.reshape(len(prompts), images_per_prompt).mean(1)
        out[name] = {
            "mean": float(s.mean()),
            "std": float(s.std()) if s.numel() > 1 else math.nan,
            "per_prompt": [float(v) for v in per_prompt],
        }
    return out


def task_generator(
    task: Any,
    model: torch.nn.Module,
    device: torch.device | str,
    *,
    num_steps: int = 28,
    guidance_scale: float | None = None,
    seed: int = 0,
) -> Generator:
    """A generator over a diffusers task's sampler (``task.generate``, at ``guidance_scale``, default the task's):
    image i of each call gets noise seed (seed, i), so two models evaluated with the same seed start from the
    same noise."""

    def generate(prompts: Sequence[str]) -> torch.Tensor:
        return task.generate(
            model, list(prompts), torch.device(device), num_steps=num_steps, guidance_scale=guidance_scale, seed=seed
        )

    return generate
