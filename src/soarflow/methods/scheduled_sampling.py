r"""Scheduled sampling for flow matching: train on the model's own k-step rollout state, with the flow target.

For a batch :math:`(x_0, c)` with noise :math:`z_1` and training time :math:`t` (the SFT draws):

1. draw an offset :math:`k \in \{1..K\}` per sample (``strategy``: ``uniform`` :math:`P(k) = 1/K`,
   ``biased_early`` :math:`P(k) \propto K + 1 - k` (short rollouts favoured), ``biased_late``
   :math:`P(k) \propto k`), applied with probability :math:`p` (otherwise k = 0); k is capped at
   :math:`\lfloor N(1 - t)\rfloor` so the rollout starts at :math:`\sigma \le 1`;
2. start on the forward path at :math:`t + k/N`: :math:`x = (1-\sigma(t+k/N)) x_0 + \sigma(t+k/N) z_1`;
3. without gradient, take k guided Euler steps of the N-step training schedule,
   :math:`t + j/N \to t + (j-1)/N` for j = k..1, reaching :math:`\hat x` at :math:`\sigma(t)`;
4. loss :math:`\frac1B\sum_b w(\sigma_b)\lVert v_\theta(\hat x_b, \sigma_b, c_b) - (z_1 - x_0)_b\rVert^2`.

With k = 0 (p = 0, or at t near 1) this is exactly the SFT loss. The probability ramps linearly from 0 to p over
``ramp_steps`` optimizer steps. The ReflexFlow anti-drift target (arXiv 2512.04904) is not offered: its exact
formulas could not be obtained, and it is not guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from ..conditioning import cond_index
from ..flow import VelocityModel, append_dims, interpolate, loss_weight, per_sample_mse, shift_sigma, velocity_target
from ..sampling import guided_velocity

STRATEGIES = ("uniform", "biased_early", "biased_late")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class ScheduledSamplingConfig:
    """``scheduled_sampling:`` — rollout-state training (SimpleTuner-style keys)."""

    FORMER_KEYS: ClassVar[dict[str, str]] = {"rollout_cfg": "guidance_scale"}

    max_step_offset: int = _f(3, "K: the rollout takes k ~ {1..K} steps of the training schedule")
    probability: float = _f(1.0, "p: chance that a sample is rolled out (else it is a plain SFT sample)")
    ramp_steps: int = _f(0, "the probability ramps linearly from 0 to p over this many optimizer steps")
    strategy: Literal["uniform", "biased_early", "biased_late"] = _f("uniform", "distribution of the offset k")
    num_steps: int = _f(40, "N: the training schedule has N steps (one step is 1/N in t)")
    guidance_scale: float = _f(1.0, "guidance scale of the rollout steps (1 = conditional velocity only)")

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ValueError(f"config key '{key}': {why} (got {getattr(self, key)!r})")

        need(
            isinstance(self.max_step_offset, int) and self.max_step_offset >= 1,
            "max_step_offset",
            "must be an integer >= 1",
        )
        need(0 <= self.probability <= 1, "probability", "must be in [0, 1]")
        need(isinstance(self.ramp_steps, int) and self.ramp_steps >= 0, "ramp_steps", "must be an integer >= 0")
        need(self.strategy in STRATEGIES, "strategy", f"must be one of {', '.join(STRATEGIES)}")
        need(
            isinstance(self.num_steps, int) and self.num_steps >= self.max_step_offset,
            "num_steps",
            "must be an integer >= max_step_offset",
        )
        need(math.isfinite(self.guidance_scale), "guidance_scale", "must be finite")

    def probability_at(self, step: int) -> float:
        """p after `step` optimizer steps (linear ramp from 0)."""
        if self.ramp_steps == 0:
            return self.probability
        return self.probability * min(1.0, step / self.ramp_steps)

    def offset_probs(self) -> torch.Tensor:
        """P(k) for k = 1..K."""
        k = torch.arange(1, self.max_step_offset + 1, dtype=torch.float64)
        w = {"uniform": torch.ones_like(k), "biased_early": self.max_step_offset + 1 - k, "biased_late": k}[
            self.strategy
        ]
        return w / w.sum()


def draw_offsets(
    t: torch.Tensor, config: ScheduledSamplingConfig, probability: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Per-sample rollout length k (long tensor, (B,)): 0 with probability 1 - p, capped at floor(N (1 - t))."""
    b = t.shape[0]
    k = torch.multinomial(config.offset_probs().float().to(t.device).expand(b, -1), 1, generator=generator)[:, 0] + 1
    apply = torch.rand(b, generator=generator, device=t.device) < probability
    return torch.where(apply, torch.minimum(k, max_offsets(t, config.num_steps)), torch.zeros_like(k))


def max_offsets(t: torch.Tensor, num_steps: int) -> torch.Tensor:
    """The longest rollout that starts at sigma <= 1: floor(N (1 - t)) per sample (long, (B,))."""
    return torch.floor(num_steps * (1 - t.double()) + 1e-9).long().clamp_min(0)


@torch.no_grad()
def rollout_to(
    model: VelocityModel,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    k: torch.Tensor,
    cond: Any,
    *,
    null_cond: Any,
    config: ScheduledSamplingConfig,
    shift: float,
) -> torch.Tensor:
    """The state at sigma(t) reached by k Euler steps from the forward-noised x at t + k/N (k = 0: x_t itself)."""
    n = config.num_steps
    x = interpolate(x0, noise, shift_sigma((t + k / n).clamp(max=1.0), shift))
    for j in range(int(k.max()) if k.numel() else 0, 0, -1):
        rows = (k >= j).nonzero()[:, 0]
        s = shift_sigma((t[rows] + j / n).clamp(max=1.0), shift)
        sn = shift_sigma((t[rows] + (j - 1) / n).clamp(max=1.0), shift)
        null = cond_index(null_cond, rows) if null_cond is not None else None
        v = guided_velocity(model, x[rows], s, cond_index(cond, rows), null, config.guidance_scale)
        x = x.index_copy(0, rows, (x[rows].float() + append_dims(sn - s, x.ndim) * v.float()).to(x.dtype))
    return x


@dataclass
class ScheduledSamplingOutput:
    loss: torch.Tensor
    flow_loss: torch.Tensor  # mean unweighted squared error
    mean_offset: torch.Tensor  # mean k (0 for SFT samples)
    rollout_deviation: torch.Tensor  # mean RMS ||x_hat - x_t|| of the rolled-out samples (nan if none)
    mean_sigma: torch.Tensor


def scheduled_sampling_loss(
    model: VelocityModel,
    x0: torch.Tensor,
    cond: Any,
    *,
    noise: torch.Tensor,
    t: torch.Tensor,
    offsets: torch.Tensor,
    null_cond: Any,
    config: ScheduledSamplingConfig,
    shift: float,
    weighting: str = "none",
) -> ScheduledSamplingOutput:
    """The loss of the module doc for given noise, t (B,) and offsets k (B,)."""
    sigma = shift_sigma(t, shift)
    x_t = interpolate(x0, noise, sigma)
    x_hat = rollout_to(model, x0, noise, t, offsets, cond, null_cond=null_cond, config=config, shift=shift)
    err = per_sample_mse(model(x_hat, sigma, cond), velocity_target(x0, noise))
    loss = (loss_weight(sigma, weighting) * err).mean()
    rolled = offsets > 0
    dev = (x_hat.float() - x_t.float()).pow(2).flatten(1).mean(1).sqrt()
    return ScheduledSamplingOutput(
        loss=loss,
        flow_loss=err.detach().mean(),
        mean_offset=offsets.float().mean(),
        rollout_deviation=dev[rolled].mean() if bool(rolled.any()) else torch.tensor(float("nan")),
        mean_sigma=sigma.mean(),
    )
