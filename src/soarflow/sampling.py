r"""Guided samplers for rectified-flow velocity models, sharing their step code with the SOAR rollout.

A velocity model is any callable ``model(x, sigma, cond) -> v`` (sigma of shape (B,)). Classifier-free guidance
evaluates the conditional and unconditional velocities in one forward over the doubled batch:
:math:`v_{cfg} = v_u + w (v_c - v_u)`; ``w = 1`` is the conditional velocity alone (one forward of B).

Steps from :math:`\sigma` to :math:`\sigma_n < \sigma` (with :math:`\hat x_0 = x - \sigma v`,
:math:`\hat z_1 = x + (1-\sigma) v`, :math:`\epsilon \sim \mathcal N(0, I)`, noise scale :math:`a`):

* ``ode``: Euler, :math:`x_n = x + (\sigma_n - \sigma) v`;
* ``euler_noise``: Euler plus isotropic noise, :math:`x_n = x + (\sigma_n - \sigma) v + a\sqrt{\sigma - \sigma_n}\,\epsilon`;
* ``flow_sde``: Euler-Maruyama of the marginal-preserving reverse SDE used by Flow-GRPO, with diffusion
  :math:`g = a\sqrt{\sigma/(1-\sigma)}`:
  :math:`x_n = x + [v + \tfrac{g^2}{2\sigma}(x + (1-\sigma) v)](\sigma_n - \sigma) + g\sqrt{\sigma - \sigma_n}\,\epsilon`
  (:math:`\sigma` is capped at 0.99 inside :math:`g` so the first step from pure noise stays finite);
* ``constant_sde``: the same SDE with a constant diffusion :math:`g = a` (:math:`\sigma` floored at 1e-3 in the
  drift). It is *not* the official SOAR code's ``sde`` (which re-noises :math:`\hat x_0`: that is ``cps`` with
  :math:`a = 1`, docs/objective.md);
* ``cps``: coefficient-preserving sampling,
  :math:`x_n = (1-\sigma_n)\hat x_0 + \sigma_n\cos(\tfrac{\pi a}{2})\hat z_1 + \sigma_n\sin(\tfrac{\pi a}{2})\epsilon`,
  which keeps the state on the straight-path family of noise levels.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from .conditioning import cond_batch_size, cond_cat, cond_expand_null
from .flow import VelocityModel, append_dims, sigma_schedule

StepKind = Literal["ode", "euler_noise", "constant_sde", "flow_sde", "cps"]
STEP_KINDS = ("ode", "euler_noise", "constant_sde", "flow_sde", "cps")
# Former names of step kinds (a config naming one fails with the new name).
RENAMED_STEP_KINDS = {"simple": "euler_noise", "sde": "constant_sde"}


def _as_batch_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def guided_velocity(
    model: VelocityModel,
    x: torch.Tensor,
    sigma: torch.Tensor | float,
    cond: Any,
    null_cond: Any = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    r""":math:`v_u + w (v_c - v_u)` from one forward over ``[x, x]`` with ``[cond, null_cond]``.

    With ``guidance_scale == 1`` only the conditional half is evaluated. ``null_cond`` may have batch size 1."""
    sigma = _as_batch_sigma(sigma, x)
    if guidance_scale == 1.0:
        return model(x, sigma, cond)
    if null_cond is None:
        raise ValueError(f"null_cond is required for classifier-free guidance (guidance_scale={guidance_scale})")
    batch = x.shape[0]
    null_cond = cond_expand_null(null_cond, batch)
    v = model(torch.cat([x, x]), torch.cat([sigma, sigma]), cond_cat([cond, null_cond]))
    v_cond, v_uncond = v[:batch], v[batch:]
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def step_distribution(
    kind: StepKind,
    x: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    v: torch.Tensor,
    *,
    noise_scale: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mean and standard deviation of the Gaussian step :math:`x_n \sim \mathcal N(\mu, s^2 I)` of the given kind
    (module doc), in float32: :math:`\mu` has the shape of ``x``, :math:`s` is (B, 1, ..., 1); ``ode`` has s = 0.

    Differentiable in ``v`` (Flow-GRPO's per-step log-probabilities, :mod:`soarflow.methods.grpo`)."""
    s = append_dims(sigma.float(), x.ndim)
    sn = append_dims(sigma_next.float(), x.ndim)
    xf, vf = x.float(), v.float()
    ds = sn - s
    if kind == "ode":
        return xf + ds * vf, torch.zeros_like(s)
    if kind == "euler_noise":
        return xf + ds * vf, noise_scale * (-ds).clamp_min(0).sqrt()
    if kind in ("constant_sde", "flow_sde"):
        if kind == "flow_sde":
            # Flow-GRPO's convention: at sigma = 1 (the first step) the denominator uses the next sigma, where
            # 1 - sigma = 0 would make g infinite; the 0.99 cap guards random sigmas just below 1 (SOAR's paths).
            s_den = torch.where(s >= 1, sn, s).clamp(max=0.99)
            g = noise_scale * (s / (1 - s_den)).sqrt()
        else:
            g = torch.full_like(s, noise_scale)
        drift = vf + g**2 / (2 * s.clamp_min(1e-3)) * (xf + (1 - s) * vf)
        return xf + drift * ds, g * (-ds).clamp_min(0).sqrt()
    if kind == "cps":
        x0_hat = xf - s * vf
        z1_hat = xf + (1 - s) * vf
        angle = math.pi * noise_scale / 2
        return (1 - sn) * x0_hat + sn * math.cos(angle) * z1_hat, sn * math.sin(angle)
    raise ValueError(f"step kind must be one of {STEP_KINDS}, got {kind!r}{renamed_kind_hint(kind)}")


def renamed_kind_hint(kind: Any) -> str:
    """`` ('sde' is now 'constant_sde' ...)`` for a former step-kind name, else ``""``."""
    if kind not in RENAMED_STEP_KINDS:
        return ""
    hint = f" ({kind!r} is now {RENAMED_STEP_KINDS[kind]!r}"
    if kind == "sde":
        hint += "; the official SOAR code's 'sde' re-noises x0_hat, which is 'cps' with noise scale 1"
    return hint + ")"


def step(
    kind: StepKind,
    x: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    v: torch.Tensor,
    *,
    noise_scale: float = 0.0,
    generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""One step of the given kind from per-sample `sigma` to `sigma_next` (both shape (B,)); see module doc.
    Draws :math:`\mu + s\,\epsilon` from :func:`step_distribution` (:math:`\epsilon` = ``eps`` if given,
    else drawn from ``generator``)."""
    mean, std = step_distribution(kind, x, sigma, sigma_next, v, noise_scale=noise_scale)
    if kind == "ode":
        return mean.to(x.dtype)
    if eps is None:
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return (mean + std * eps).to(x.dtype)


@torch.no_grad()
def integrate(
    model: VelocityModel,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Any,
    *,
    null_cond: Any = None,
    guidance_scale: float = 1.0,
    kind: StepKind = "ode",
    noise_scale: float = 0.0,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
):
    """Integrate from ``x`` at ``sigmas[0]`` over the decreasing grid ``sigmas`` (shape (S+1,)).

    Stochastic kinds take their last step (to ``sigmas[-1]``) deterministically so the output carries no
    fresh noise. Returns the final state, or ``(final, trajectory)`` with the S+1 visited states."""
    if cond_batch_size(cond) not in (None, x.shape[0]):
        raise ValueError(f"cond: batch size {cond_batch_size(cond)} does not match x batch size {x.shape[0]}")
    traj = [x] if return_trajectory else None
    n = len(sigmas) - 1
    for i in range(n):
        s = _as_batch_sigma(sigmas[i], x)
        sn = _as_batch_sigma(sigmas[i + 1], x)
        v = guided_velocity(model, x, s, cond, null_cond, guidance_scale)
        step_kind = "ode" if i == n - 1 else kind
        x = step(step_kind, x, s, sn, v, noise_scale=noise_scale, generator=generator)
        if traj is not None:
            traj.append(x)
    return (x, traj) if return_trajectory else x


def sample_euler(
    model: VelocityModel,
    noise: torch.Tensor,
    cond: Any,
    *,
    null_cond: Any = None,
    num_steps: int = 40,
    guidance_scale: float = 1.0,
    shift: float = 1.0,
    return_trajectory: bool = False,
):
    """Deterministic N-step Euler sampler from ``noise`` (sigma = 1) on the shifted grid ``sigma_schedule(N, shift)``."""
    sigmas = sigma_schedule(num_steps, shift, device=noise.device)
    return integrate(
        model,
        noise,
        sigmas,
        cond,
        null_cond=null_cond,
        guidance_scale=guidance_scale,
        return_trajectory=return_trajectory,
    )


def sample_sde(
    model: VelocityModel,
    noise: torch.Tensor,
    cond: Any,
    *,
    null_cond: Any = None,
    num_steps: int = 40,
    guidance_scale: float = 1.0,
    shift: float = 1.0,
    noise_scale: float = 0.7,
    kind: StepKind = "flow_sde",
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
):
    """Stochastic N-step sampler (``flow_sde`` by default, as in Flow-GRPO with noise level 0.7)."""
    sigmas = sigma_schedule(num_steps, shift, device=noise.device)
    return integrate(
        model,
        noise,
        sigmas,
        cond,
        null_cond=null_cond,
        guidance_scale=guidance_scale,
        kind=kind,
        noise_scale=noise_scale,
        generator=generator,
        return_trajectory=return_trajectory,
    )
