r"""The official SOAR release's training step, ported as the timing anchor of bench/scale.py.

Written from the description of the release's loop in the paper notes (not copied): per optimizer step it runs

1. one guided rollout forward over 2B rows, ``[uncond, cond]`` in one call, *with* autograd on and the output
   detached (the release does not wrap it in ``no_grad``), then one Euler step to :math:`\sigma_1`;
2. one forward + backward of the B-row base (SFT) term;
3. K forward + backward passes of the B-row auxiliary terms, one per point, in a Python loop.

Each backward carries its term's share of :math:`L = (\sum_b \ell_b + \lambda \sum_p a_p) / (B + \lambda P)`
(:math:`P = K B`, every point valid on the ODE path), so the accumulated gradient is the gradient of the same
loss as :func:`soarflow.soar_loss` with one ODE path (tests/bench/test_official_loop.py checks this on a toy
model). What it leaves out of the release: the snapping of :math:`\sigma` to the scheduler's 1000-point grid,
stochastic paths and condition dropout (none of them changes the cost). With ``guidance_scale == 1`` (FLUX.1-dev,
guidance-distilled) the rollout is one B-row conditional forward: the release (SD3.5-M only) has no such case.
"""

from __future__ import annotations

from typing import Any

import torch

from soarflow.conditioning import cond_cat, cond_expand_null
from soarflow.flow import shift_sigma


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).square().flatten(1).mean(1)


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def official_step(
    model: Any,
    x0: torch.Tensor,
    cond: Any,
    null_cond: Any,
    *,
    num_aux: int = 6,
    lambda_aux: float = 1.0,
    guidance_scale: float = 4.5,
    rollout_steps: int = 40,
    shift: float = 3.0,
    sigma_floor: float = 1e-3,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    aux_sigmas: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the release's forward/backward passes for one micro-batch; gradients accumulate into ``.grad``.

    ``noise`` (shape of x0), ``t`` (B,) and ``aux_sigmas`` (K, B) override the random draws (logit-normal t,
    :math:`\\sigma' \\sim U[\\sigma_1, 1]`). Returns the loss value (detached)."""
    batch, device = x0.shape[0], x0.device
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=torch.float32).to(x0.dtype)
    if t is None:
        t = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    sigma0 = shift_sigma(t, shift)
    sigma1 = shift_sigma((t - 1.0 / rollout_steps).clamp_min(0), shift)
    if aux_sigmas is None:
        u = torch.rand(num_aux, batch, generator=generator, device=device)
        aux_sigmas = (sigma1 + u * (1 - sigma1)).clamp_min(sigma_floor)
    x_t = (1 - _col(sigma0, x0)) * x0 + _col(sigma0, x0) * noise

    # 1. the rollout: autograd on (as released), output detached
    if guidance_scale != 1.0:
        v = model(
            torch.cat([x_t, x_t]), torch.cat([sigma0, sigma0]), cond_cat([cond_expand_null(null_cond, batch), cond])
        ).detach()
        v_u, v_c = v[:batch], v[batch:]
        v_g = v_u + guidance_scale * (v_c - v_u)
    else:
        v_g = model(x_t, sigma0, cond).detach()
    z_prime = x_t + _col(sigma1 - sigma0, x0) * v_g

    denom = batch + lambda_aux * num_aux * batch
    # 2. the base term: forward + backward
    main = _per_sample_mse(model(x_t, sigma0, cond), noise - x0).sum()
    (main / denom).backward()
    total = main.detach()
    # 3. the auxiliary terms, one forward + backward per point
    for k in range(num_aux):
        s = aux_sigmas[k]
        alpha = _col((s - sigma1) / (1 - sigma1), x0)
        z_aux = (1 - alpha) * z_prime + alpha * noise
        v_corr = (z_aux - x0) / _col(s, x0)
        aux = _per_sample_mse(model(z_aux, s, cond), v_corr).sum()
        (lambda_aux * aux / denom).backward()
        total = total + lambda_aux * aux.detach()
    return total / denom
