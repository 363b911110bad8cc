"""Scheduled sampling and input perturbation against independent per-sample reference computations."""

from __future__ import annotations

import pytest
import torch

from soarflow.flow import shift_sigma
from soarflow.methods.input_perturbation import input_perturbation_loss
from soarflow.methods.scheduled_sampling import (
    ScheduledSamplingConfig,
    draw_offsets,
    max_offsets,
    rollout_to,
    scheduled_sampling_loss,
)
from soarflow.objective import SOARConfig, sft_loss


class Affine(torch.nn.Module):
    def __init__(self, dim=5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(dim, dim, generator=g) * 0.3)
        self.c = torch.nn.Parameter(torch.randn(dim, generator=g))

    def forward(self, x, sigma, cond):
        return torch.tanh(x @ self.w.T) + sigma[:, None] * self.c + cond


def _data(b=6, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, dim, generator=g),
        torch.randn(b, dim, generator=g),
        torch.randn(b, dim, generator=g),
        torch.rand(b, generator=g) * 0.8,
    )


def test_rollout_reaches_sigma_t_by_k_explicit_euler_steps():
    model, cfg, shift = Affine(), ScheduledSamplingConfig(max_step_offset=3, num_steps=10, guidance_scale=1.0), 3.0
    x0, z1, cond, t = _data()
    k = torch.tensor([0, 1, 2, 3, 1, 0])
    got = rollout_to(model, x0, z1, t, k, cond, null_cond=None, config=cfg, shift=shift)
    for b in range(6):  # reference: one sample at a time, a plain loop over the grid t + j/N
        sig = lambda j: shift_sigma(torch.tensor([min(float(t[b]) + j / 10, 1.0)]), shift)  # noqa: E731
        x = (1 - sig(int(k[b]))) * x0[b : b + 1] + sig(int(k[b])) * z1[b : b + 1]
        for j in range(int(k[b]), 0, -1):
            with torch.no_grad():
                x = x + (sig(j - 1) - sig(j)) * model(x, sig(j), cond[b : b + 1])
        torch.testing.assert_close(got[b : b + 1], x, rtol=1e-5, atol=1e-6)


def test_scheduled_sampling_with_no_offset_is_sft_and_otherwise_uses_the_flow_target():
    model, cfg = Affine(seed=1), ScheduledSamplingConfig(max_step_offset=2, num_steps=8)
    x0, z1, cond, t = _data(seed=1)
    zero = scheduled_sampling_loss(
        model, x0, cond, noise=z1, t=t, offsets=torch.zeros(6, dtype=torch.long), null_cond=None, config=cfg, shift=1.0
    )
    ref = sft_loss(model, x0, cond, config=SOARConfig(num_aux=0, shift=1.0), noise=z1, t=t)
    torch.testing.assert_close(zero.loss, ref.loss)

    k = torch.tensor([2, 1, 2, 1, 2, 1])
    out = scheduled_sampling_loss(model, x0, cond, noise=z1, t=t, offsets=k, null_cond=None, config=cfg, shift=1.0)
    x_hat = rollout_to(model, x0, z1, t, k, cond, null_cond=None, config=cfg, shift=1.0)
    manual = ((model(x_hat, t, cond) - (z1 - x0)) ** 2).mean(1).mean()
    torch.testing.assert_close(out.loss, manual)
    assert float(out.mean_offset) == 1.5 and float(out.rollout_deviation) > 0
    out.loss.backward()  # gradient flows only through the training forward (the rollout is detached)
    assert model.w.grad is not None


def test_offset_distribution_strategies_probability_cap_and_ramp():
    g = torch.Generator().manual_seed(0)
    for strategy, probs in (
        ("uniform", [1 / 3] * 3),
        ("biased_early", [3 / 6, 2 / 6, 1 / 6]),
        ("biased_late", [1 / 6, 2 / 6, 3 / 6]),
    ):
        cfg = ScheduledSamplingConfig(max_step_offset=3, strategy=strategy, num_steps=10)
        torch.testing.assert_close(cfg.offset_probs(), torch.tensor(probs, dtype=torch.float64))
        k = draw_offsets(torch.zeros(30000), cfg, 1.0, g)
        freq = torch.bincount(k, minlength=4)[1:].double() / 30000
        torch.testing.assert_close(freq, torch.tensor(probs, dtype=torch.float64), atol=0.015, rtol=0)
    cfg = ScheduledSamplingConfig(max_step_offset=3, num_steps=10, probability=0.5, ramp_steps=100)
    k = draw_offsets(torch.zeros(20000), cfg, 0.25, g)
    assert abs(float((k > 0).double().mean()) - 0.25) < 0.02
    assert cfg.probability_at(0) == 0 and cfg.probability_at(50) == 0.25 and cfg.probability_at(500) == 0.5
    t = torch.tensor([0.0, 0.75, 0.85, 0.95, 1.0])
    assert max_offsets(t, 10).tolist() == [10, 2, 1, 0, 0]  # the rollout never starts above sigma = 1
    assert (
        draw_offsets(t, ScheduledSamplingConfig(max_step_offset=3, num_steps=10), 1.0, g) <= max_offsets(t, 10)
    ).all()


def test_scheduled_sampling_config_errors():
    with pytest.raises(ValueError, match="'strategy'"):
        ScheduledSamplingConfig(strategy="late")
    with pytest.raises(ValueError, match="'num_steps'"):
        ScheduledSamplingConfig(max_step_offset=5, num_steps=4)


def test_input_perturbation_matches_its_definition_and_gamma_zero_is_sft():
    model = Affine(seed=2)
    x0, z1, cond, t = _data(seed=2)
    xi = torch.randn(6, 5, generator=torch.Generator().manual_seed(9))
    zero = input_perturbation_loss(model, x0, cond, noise=z1, perturbation=xi, sigma=t, gamma=0.0)
    ref = sft_loss(model, x0, cond, config=SOARConfig(num_aux=0, shift=1.0), noise=z1, t=t)
    torch.testing.assert_close(zero.loss, ref.loss)
    out = input_perturbation_loss(model, x0, cond, noise=z1, perturbation=xi, sigma=t, gamma=0.3)
    s = t[:, None]
    manual = ((model((1 - s) * x0 + s * (z1 + 0.3 * xi), t, cond) - (z1 - x0)) ** 2).mean(1).mean()
    torch.testing.assert_close(out.loss, manual)
