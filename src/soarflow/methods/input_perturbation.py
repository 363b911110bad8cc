r"""Input perturbation (DDPM-IP, Ning et al. 2023) for flow matching.

The input is built from a perturbed noise, the target from the clean one:
:math:`x_\sigma = (1-\sigma) x_0 + \sigma (z_1 + \gamma\xi)`, :math:`\xi \sim \mathcal N(0, I)` independent of
:math:`z_1`, and :math:`L = \frac1B\sum_b w(\sigma_b)\lVert v_\theta(x_\sigma, \sigma, c) - (z_1 - x_0)\rVert^2`.
So the model sees inputs off the forward path by :math:`\sigma\gamma\xi`, as a sampler's accumulated error would
put them, and is asked for the velocity of the clean path. :math:`\gamma = 0` is SFT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..flow import VelocityModel, interpolate, loss_weight, per_sample_mse, velocity_target


@dataclass
class InputPerturbationConfig:
    """``input_perturbation:`` — DDPM-IP."""

    gamma: float = field(default=0.1, metadata={"help": "scale of the extra input noise (DDPM-IP default 0.1)"})

    def __post_init__(self) -> None:
        if not (isinstance(self.gamma, (int, float)) and 0 <= self.gamma < float("inf")):
            raise ValueError(f"config key 'gamma': must be a finite number >= 0 (got {self.gamma!r})")


@dataclass
class InputPerturbationOutput:
    loss: torch.Tensor
    flow_loss: torch.Tensor
    mean_sigma: torch.Tensor


def input_perturbation_loss(
    model: VelocityModel,
    x0: torch.Tensor,
    cond: Any,
    *,
    noise: torch.Tensor,
    perturbation: torch.Tensor,
    sigma: torch.Tensor,
    gamma: float,
    weighting: str = "none",
) -> InputPerturbationOutput:
    """The loss of the module doc for given noise z1, perturbation xi (both shaped like x0) and sigma (B,)."""
    x_in = interpolate(x0, noise + gamma * perturbation, sigma)
    err = per_sample_mse(model(x_in, sigma, cond), velocity_target(x0, noise))
    loss = (loss_weight(sigma, weighting) * err).mean()
    return InputPerturbationOutput(loss=loss, flow_loss=err.detach().mean(), mean_sigma=sigma.mean())
