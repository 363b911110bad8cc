r"""The evaluations a study runs on every cell; all cells see the same prompts / samples and the same noise.

``shapes`` (:class:`ShapesStudyEval`): for each sampler setting (num_steps, guidance_scale),
:func:`soarflow.shapes.evaluate.evaluate_setting` (the demo's evaluation): ShapesEval overall / per family / seen
vs held-out, per-image pass/fail and reward, FD and diversity against real renders, exposure gap per sigma bin.

``loss`` (:class:`LossStudyEval`, any task, e.g. diffusers): on the first ``num_samples`` training samples, the
per-sample flow-matching error at fixed noise :math:`z` and fixed levels :math:`\sigma_j`,
:math:`\ell_i = \frac1J\sum_j \mathrm{mean}\,(v(x_{\sigma_j}, \sigma_j, c_i) - (z_i - x_{0,i}))^2` with
:math:`x_\sigma = (1-\sigma)x_0 + \sigma z`, and the exposure gap at each setting.

Per-image arrays (``per_image``; ``per_prompt`` for diversity, one value per prompt in prompt order) are what the
report's intervals are computed from (:mod:`soarflow.study.stats`): images cluster by prompt, image i belonging to
prompt ``i // images_per_prompt``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .spec import EvalSpec, setting_key


class ShapesStudyEval:
    """ShapesEval prompts, real renders and a smaller curve set, built once per study."""

    higher_is_better = {"overall": True, "reward": True}

    def __init__(self, spec: EvalSpec):
        from ..shapes import ShapesEval, render

        self.spec = spec
        self.bench = ShapesEval(
            prompts_per_family=spec.prompts_per_family, images_per_prompt=spec.images_per_prompt, seed=spec.seed
        )
        self.prompts = [p.text for p in self.bench.prompts for _ in range(spec.images_per_prompt)]
        self.groups = [p.index for p in self.bench.prompts for _ in range(spec.images_per_prompt)]
        self.real = render(self.prompts, seed=spec.seed + 1)
        curve = ShapesEval(prompts_per_family=spec.curve_prompts_per_family, images_per_prompt=1, seed=spec.seed)
        self.curve_prompts = [p.text for p in curve.prompts]

    def full(self, model: torch.nn.Module) -> dict[str, Any]:
        from ..shapes.evaluate import evaluate_setting

        out = {}
        for n, w in self.spec.settings:
            t0 = time.perf_counter()
            metrics, _, report = evaluate_setting(
                model,
                self.prompts,
                self.groups,
                self.real,
                num_steps=n,
                guidance_scale=w,
                seed=self.spec.seed,
                exposure_images=self.spec.exposure_images,
                shift=self.spec.shift,
            )
            se = metrics["shapes_eval"]
            out[setting_key(n, w)] = {
                "overall": se["overall"],
                "reward": se["mean_reward"],
                "per_family": se["per_family"],
                "seen": se["seen"],
                "held_out": se["held_out"],
                "frechet_distance": metrics["frechet_distance"],
                "diversity": metrics["diversity"],
                "exposure_gap": metrics["exposure_bias"]["mean_gap"],
                "exposure_bins": [
                    {k: b[k] for k in ("sigma_low", "sigma_high", "gap")} for b in metrics["exposure_bias"]["bins"]
                ],
                "per_image": {
                    "overall": [float(r.correct) for r in report.records],
                    "reward": [float(r.reward) for r in report.records],
                },
                "per_prompt": {
                    "diversity": [metrics["diversity_per_group"][g] for g in sorted(metrics["diversity_per_group"])]
                },
                "eval_seconds": round(time.perf_counter() - t0, 2),
            }
        return out

    def curve(self, model: torch.nn.Module) -> float:
        """ShapesEval overall on the small curve set at (curve_num_steps, curve_guidance_scale)."""
        from ..shapes.generate import generate_images
        from ..shapes import score

        images = generate_images(
            model,
            self.curve_prompts,
            num_steps=self.spec.curve_num_steps,
            guidance_scale=self.spec.curve_guidance_scale,
            shift=self.spec.shift,
            seed=self.spec.seed,
        )
        return float(score(images, self.curve_prompts).overall)


class LossStudyEval:
    """Task-agnostic evaluation (module docstring): works for any `Task` (shapes, sd3, flux)."""

    higher_is_better = {"fm_loss": False}

    def __init__(self, spec: EvalSpec, task: Any):
        self.spec = spec
        self.task = task
        dataset = task.train_dataset()
        n = min(spec.num_samples, len(dataset))
        if n < 2:
            raise ValueError(f"evaluation kind 'loss' needs >= 2 samples, the dataset has {len(dataset)}")
        self.batch = task.collate([dataset[i] for i in range(n)])
        self._encoded: tuple | None = None

    def _data(self, device: torch.device):
        if self._encoded is None:
            x0, cond = self.task.encode_batch(self.batch, device)
            g = torch.Generator().manual_seed(self.spec.seed)
            z = torch.randn(x0.shape, generator=g, dtype=torch.float32).to(device, x0.dtype)
            self._encoded = (x0, cond, z, self.task.null_cond(x0.shape[0], device))
        return self._encoded

    @torch.no_grad()
    def fm_loss(self, model: torch.nn.Module) -> torch.Tensor:
        device = next(model.parameters()).device
        x0, cond, z, _ = self._data(device)
        per = torch.zeros(x0.shape[0], dtype=torch.float64)
        for s in self.spec.loss_sigmas:
            sigma = torch.full((x0.shape[0],), float(s), device=device)
            x = (1 - s) * x0 + s * z
            v = model(x, sigma.to(x.dtype), cond)
            per += (v.float() - (z - x0).float()).square().flatten(1).mean(1).double().cpu()
        return per / len(self.spec.loss_sigmas)

    def full(self, model: torch.nn.Module) -> dict[str, Any]:
        from ..shapes.metrics import exposure_bias

        device = next(model.parameters()).device
        x0, cond, _, null = self._data(device)
        loss = self.fm_loss(model)
        out = {}
        for n, w in self.spec.settings:
            t0 = time.perf_counter()
            eb = exposure_bias(
                model,
                x0,
                cond,
                null_cond=null,
                num_steps=n,
                guidance_scale=w,
                shift=self.spec.shift,
                generator=torch.Generator().manual_seed(self.spec.seed),
            )
            out[setting_key(n, w)] = {
                "fm_loss": float(loss.mean()),
                "exposure_gap": eb.mean_gap,
                "exposure_bins": [
                    {"sigma_low": b.sigma_low, "sigma_high": b.sigma_high, "gap": b.gap} for b in eb.bins
                ],
                "per_image": {"fm_loss": loss.tolist()},
                "eval_seconds": round(time.perf_counter() - t0, 2),
            }
        return out

    def curve(self, model: torch.nn.Module) -> float:
        return float(self.fm_loss(model).mean())


def build_evaluator(spec: EvalSpec, task: Any):
    if spec.kind == "shapes":
        return ShapesStudyEval(spec)
    return LossStudyEval(spec, task)
