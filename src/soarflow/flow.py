r"""Rectified-flow conventions shared by the objective, the samplers and the metrics.

SD3 / SD3.5 / FLUX conventions:

* clean sample :math:`x_0`, noise :math:`z_1 \sim \mathcal N(0, I)`, noise level :math:`\sigma \in [0, 1]`;
* the straight path :math:`x_\sigma = (1-\sigma)\,x_0 + \sigma\,z_1`;
* the model predicts the velocity :math:`v = dx_\sigma/d\sigma = z_1 - x_0`;
* sampling integrates :math:`dx/d\sigma = v` from :math:`\sigma = 1` (noise) down to 0;
* the clean-sample estimate from any state is :math:`\hat x_0 = x - \sigma v`;
* time :math:`t \in [0,1]` maps to :math:`\sigma` through the shift :math:`s`:
  :math:`\sigma(t) = s t / (1 + (s-1) t)` (:math:`s=3` for SD3.5, :math:`s=1` is the identity).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch

# A velocity model: ``model(x, sigma, cond) -> v`` with x (B, ...), sigma (B,) in [0, 1] and any condition
# (tensor, dict of batch-first tensors, None). Every sampler, objective and method takes one.
VelocityModel = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
TDensity = Literal["logit_normal", "uniform", "mode", "cosmap"]
Weighting = Literal["none", "sigma_sqrt", "cosmap"]
T_DENSITIES = ("logit_normal", "uniform", "mode", "cosmap")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def append_dims(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-sample tensor of shape (B,) to (B, 1, ..., 1) with `ndim` dimensions."""
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def shift_sigma(t: torch.Tensor, shift: float) -> torch.Tensor:
    r""":math:`\sigma(t) = s t / (1 + (s-1) t)`; monotone, fixes 0 and 1.

    The denominator is written :math:`s t + (1 - t)`, so that t = 1 gives s / s = 1 exactly (``1 + (s-1)`` can
    round away from s: sigma(1) was 1 - 1 ulp for s = 0.32 and 1 + 1 ulp for s = 0.1); the clamp to [0, 1] keeps
    the re-noising weight alpha in [0, 1] whatever the rounding inside."""
    if shift == 1.0:
        return t
    return (shift * t / (shift * t + (1.0 - t))).clamp(0.0, 1.0)


def sigma_schedule(num_steps: int, shift: float = 1.0, device=None, dtype=torch.float32) -> torch.Tensor:
    r"""The N-step inference grid: :math:`\sigma(t_i)` for :math:`t_i = 1 - i/N`, i = 0..N (shape (N+1,), 1 -> 0)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, device=device, dtype=torch.float64)
    return shift_sigma(t, shift).to(dtype)


def sample_t(
    batch_size: int,
    *,
    density: TDensity = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    uniform_fraction: float = 0.0,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    r"""Draw training times :math:`t \in (0, 1)` (shape (B,)) from the SD3 densities.

    * ``logit_normal``: :math:`t = \mathrm{sigmoid}(u),\ u \sim \mathcal N(\mu, s^2)`;
    * ``uniform``: :math:`t \sim U(0, 1)`;
    * ``mode``: :math:`t = 1 - u - m(\cos^2(\pi u / 2) - 1 + u)`, :math:`u \sim U(0,1)` (SD3 eq. 20);
    * ``cosmap``: :math:`t = 1 - 1/(\tan(\pi u / 2) + 1)` (SD3 eq. 21).

    With ``uniform_fraction`` f > 0 the density is the mixture :math:`(1 - f)\,p(t) + f\,U(0, 1)`: each t is
    replaced by a fresh :math:`U(0, 1)` draw with probability f (the pretraining recipe keeps the high-noise levels,
    where the layout is decided, in the mix). f = 0 draws nothing extra.
    """
    t = _sample_t_density(batch_size, density, logit_mean, logit_std, mode_scale, generator, device)
    if uniform_fraction > 0:
        u = torch.rand(batch_size, generator=generator, device=device)
        pick = torch.rand(batch_size, generator=generator, device=device) < uniform_fraction
        t = torch.where(pick, u, t)
    return t


def _sample_t_density(batch_size, density, logit_mean, logit_std, mode_scale, generator, device) -> torch.Tensor:
    if density == "logit_normal":
        u = torch.randn(batch_size, generator=generator, device=device) * logit_std + logit_mean
        return torch.sigmoid(u)
    u = torch.rand(batch_size, generator=generator, device=device)
    if density == "uniform":
        return u
    if density == "mode":
        return 1.0 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1.0 + u)
    if density == "cosmap":
        return 1.0 - 1.0 / (torch.tan(math.pi * u / 2) + 1.0)
    raise ValueError(f"density must be one of {T_DENSITIES}, got {density!r}")


def interpolate(x0: torch.Tensor, z1: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    r""":math:`x_\sigma = (1-\sigma) x_0 + \sigma z_1` with per-sample sigma of shape (B,)."""
    s = append_dims(sigma, x0.ndim).to(x0.dtype)
    return (1.0 - s) * x0 + s * z1


def velocity_target(x0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    r"""The flow-matching target :math:`v = z_1 - x_0`."""
    return z1 - x0


def x0_from_velocity(x: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r""":math:`\hat x_0 = x - \sigma v` (exact on the straight path)."""
    return x - append_dims(sigma, x.ndim).to(x.dtype) * v


def loss_weight(sigma: torch.Tensor, scheme: Weighting = "none") -> torch.Tensor:
    r"""SD3 loss weighting per sample: ``none`` = 1, ``sigma_sqrt`` = :math:`\sigma^{-2}`,
    ``cosmap`` = :math:`2 / (\pi (1 - 2\sigma + 2\sigma^2))` (as in diffusers' `compute_loss_weighting_for_sd3`)."""
    if scheme == "none":
        return torch.ones_like(sigma)
    if scheme == "sigma_sqrt":
        return sigma.clamp_min(1e-6) ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigma + 2.0 * sigma**2))
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {scheme!r}")


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over all non-batch dimensions, in float32 (shape (B,))."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
