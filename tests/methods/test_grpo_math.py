"""Flow-GRPO math against independent reference computations (torch.distributions, hand-written formulas)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from soarflow.methods.grpo import (
    GRPOConfig,
    check_rewards,
    choose_timesteps,
    gaussian_kl,
    gaussian_log_prob,
    group_advantages,
    grpo_loss,
    ppo_clip_loss,
    sample_with_log_probs,
)
from soarflow.sampling import step, step_distribution


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_flow_sde_step_mean_and_std_match_the_flow_grpo_form():
    # Flow-GRPO writes the SDE step as x (1 + g^2/(2 s) dt) + v (1 + g^2 (1 - s)/(2 s)) dt, noise g sqrt(-dt)
    x, v = _rand(3, 2, 4, seed=1), _rand(3, 2, 4, seed=2)
    s, sn, a = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.7, 0.4, 0.0]), 0.7
    mean, std = step_distribution("flow_sde", x, s, sn, v, noise_scale=a)
    for b in range(3):
        si, dt = float(s[b]), float(sn[b] - s[b])
        g = a * math.sqrt(si / (1 - si))
        ref = x[b] * (1 + g**2 / (2 * si) * dt) + v[b] * (1 + g**2 * (1 - si) / (2 * si)) * dt
        torch.testing.assert_close(mean[b], ref, rtol=1e-5, atol=1e-6)
        assert float(std[b].flatten()[0]) == pytest.approx(g * math.sqrt(-dt), rel=1e-6)


def test_flow_sde_first_step_from_pure_noise_uses_the_next_sigma_like_flow_grpo():
    # at sigma = 1, g = a sqrt(sigma / (1 - sigma_max)) with sigma_max = the schedule's second sigma (the next one);
    # a cap at sigma 0.99 instead made the first step of a 10-step schedule 3x too noisy and flipped its mean
    x, v = _rand(1, 2, 4, seed=1), _rand(1, 2, 4, seed=2)
    s, sn, a = torch.tensor([1.0]), torch.tensor([0.9]), 0.7
    mean, std = step_distribution("flow_sde", x, s, sn, v, noise_scale=a)
    g, dt = a * math.sqrt(1.0 / (1 - 0.9)), -0.1
    ref = x[0] * (1 + g**2 / 2 * dt) + v[0] * dt
    torch.testing.assert_close(mean[0], ref, rtol=1e-5, atol=1e-6)
    assert float(std[0].flatten()[0]) == pytest.approx(g * math.sqrt(-dt), rel=1e-6)


def test_cps_step_mean_and_std():
    x, v = _rand(2, 5, seed=3), _rand(2, 5, seed=4)
    s, sn, a = torch.tensor([0.8, 0.3]), torch.tensor([0.6, 0.1]), 0.7
    mean, std = step_distribution("cps", x, s, sn, v, noise_scale=a)
    for b in range(2):
        x0_hat, z1_hat = x[b] - s[b] * v[b], x[b] + (1 - s[b]) * v[b]
        ref = (1 - sn[b]) * x0_hat + sn[b] * math.cos(math.pi * a / 2) * z1_hat
        torch.testing.assert_close(mean[b], ref, rtol=1e-5, atol=1e-6)
        assert float(std[b, 0]) == pytest.approx(float(sn[b]) * math.sin(math.pi * a / 2), rel=1e-6)


@pytest.mark.parametrize("kind", ["euler_noise", "constant_sde", "flow_sde", "cps"])
def test_step_draws_mean_plus_std_times_the_generators_noise(kind):
    x, v = _rand(2, 3, 4, seed=5), _rand(2, 3, 4, seed=6)
    s, sn = torch.tensor([0.9, 0.4]), torch.tensor([0.8, 0.2])
    out = step(kind, x, s, sn, v, noise_scale=0.6, generator=torch.Generator().manual_seed(7))
    mean, std = step_distribution(kind, x, s, sn, v, noise_scale=0.6)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, mean + std * eps)


def test_log_prob_and_kl_match_torch_distributions():
    x, mean, mean_ref = _rand(4, 3, 2, seed=8), _rand(4, 3, 2, seed=9), _rand(4, 3, 2, seed=10)
    std = torch.tensor([0.3, 0.7, 1.2, 0.05]).view(4, 1, 1)
    ref = Normal(mean, std.expand_as(mean)).log_prob(x).flatten(1).mean(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), ref)
    kl = kl_divergence(Normal(mean, std.expand_as(mean)), Normal(mean_ref, std.expand_as(mean))).flatten(1).mean(1)
    torch.testing.assert_close(gaussian_kl(mean, mean_ref, std), kl)


def test_group_advantages_normalise_within_groups_and_clip():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 10.0])
    adv = group_advantages(r, 4, clip=1.5)
    for g in range(3):
        chunk = r[4 * g : 4 * g + 4].numpy()
        ref = (chunk - chunk.mean()) / (chunk.std() + 1e-4)  # numpy std: population
        torch.testing.assert_close(adv[4 * g : 4 * g + 4], torch.tensor(ref).float().clamp(-1.5, 1.5))
    assert adv[4:8].abs().max() == 0  # equal rewards: no signal
    assert adv[11] == 1.5  # clipped
    with pytest.raises(ValueError, match="multiple of group_size 4"):
        group_advantages(torch.ones(6), 4, 5.0)


def test_ppo_loss_gradient_is_the_policy_gradient_at_ratio_one_and_zero_when_clipped():
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    logp = theta * 2.0  # toy differentiable log-prob
    old = logp.detach()
    loss, clipped = ppo_clip_loss(logp, old, adv, 1e-4)
    loss.sum().backward()
    torch.testing.assert_close(theta.grad, -adv * 2.0)  # d/dtheta of -A exp(logp - old) at ratio 1
    assert clipped.sum() == 0

    # zero advantage: zero gradient
    theta.grad = None
    loss, _ = ppo_clip_loss(theta * 2.0, (theta * 2.0).detach(), torch.zeros(3), 1e-4)
    loss.sum().backward()
    assert theta.grad.abs().max() == 0

    # ratio beyond 1 + eps with A > 0 (and below 1 - eps with A < 0): the clipped branch is taken, no gradient
    theta.grad = None
    logp = theta * 1.0
    old = (theta * 1.0).detach() - torch.tensor([0.1, -0.1, 0.0])
    loss, clipped = ppo_clip_loss(logp, old, torch.tensor([1.0, -1.0, 1.0]), 0.01)
    loss.sum().backward()
    assert theta.grad[0] == 0 and theta.grad[1] == 0 and theta.grad[2] != 0
    assert clipped.tolist() == [1.0, 1.0, 0.0]


class Linear(torch.nn.Module):
    """v = W x + c sigma + cond, a small differentiable velocity model."""

    def __init__(self, dim=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(dim, dim, generator=g) * 0.1)
        self.c = torch.nn.Parameter(torch.randn(dim, generator=g) * 0.1)

    def forward(self, x, sigma, cond):
        return x @ self.w.T + sigma[:, None] * self.c + cond


@pytest.mark.parametrize("kind", ["flow_sde", "cps"])
def test_rollout_log_probs_are_those_of_the_recorded_transitions(kind):
    model = Linear()
    cfg = GRPOConfig(group_size=2, num_steps=5, sde_kind=kind, guidance_scale=2.0)
    cond, null = _rand(4, 6, seed=11), torch.zeros(1, 6)
    roll = sample_with_log_probs(
        model,
        _rand(4, 6, seed=12),
        cond,
        null_cond=null,
        config=cfg,
        shift=3.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert roll.states.shape == (6, 4, 6) and roll.log_probs.shape == (4, 4)
    for i in range(4):
        x, s, sn = roll.states[i], roll.sigmas[i].expand(4), roll.sigmas[i + 1].expand(4)
        v = model(x, s, null.expand(4, 6)) + 2.0 * (model(x, s, cond) - model(x, s, null.expand(4, 6)))
        mean, std = step_distribution(kind, x, s, sn, v, noise_scale=0.7)
        ref = Normal(mean, std.expand_as(mean)).log_prob(roll.states[i + 1]).mean(1)
        torch.testing.assert_close(roll.log_probs[i], ref, rtol=1e-4, atol=1e-4)
    # the last step is the Euler step: deterministic
    s, v = roll.sigmas[4].expand(4), None
    v = model(roll.states[4], s, null.expand(4, 6)) + 2.0 * (
        model(roll.states[4], s, cond) - model(roll.states[4], s, null.expand(4, 6))
    )
    torch.testing.assert_close(roll.images, roll.states[4] + (0 - roll.sigmas[4]) * v)


def test_grpo_loss_on_policy_ratio_one_kl_zero_for_identical_reference_and_gradient_sign():
    model = Linear(seed=1)
    cfg = GRPOConfig(group_size=2, num_steps=6, train_timesteps=3, guidance_scale=1.0, beta=0.5)
    cond = _rand(4, 6, seed=13)
    roll = sample_with_log_probs(
        model,
        _rand(4, 6, seed=14),
        cond,
        null_cond=None,
        config=cfg,
        shift=1.0,
        generator=torch.Generator().manual_seed(1),
    )
    steps = choose_timesteps(4, cfg, torch.Generator().manual_seed(2), "cpu")
    assert steps.shape == (3, 4) and all(len(set(steps[:, b].tolist())) == 3 for b in range(4))
    assert int(steps.max()) <= 4  # only the S-1 = 5 stochastic steps
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    out = grpo_loss(model, roll, adv, steps, cond, null_cond=None, config=cfg, reference=model)
    assert float(out.kl) == 0 and float(out.clip_frac) == 0 and float(out.approx_kl_old) < 1e-10
    out.loss.backward()
    # at ratio 1 the gradient is -mean(A grad logp): compare with the explicit surrogate
    grad = model.w.grad.clone()
    model.zero_grad()
    rows = []
    for k in range(3):
        for b in range(4):
            j = int(steps[k, b])
            x, s, sn = roll.states[j, b : b + 1], roll.sigmas[j].view(1), roll.sigmas[j + 1].view(1)
            mean, std = step_distribution("flow_sde", x, s, sn, model(x, s, cond[b : b + 1]), noise_scale=0.7)
            rows.append(-adv[b] * Normal(mean, std.expand_as(mean)).log_prob(roll.states[j + 1, b : b + 1]).mean())
    torch.stack(rows).mean().backward()
    torch.testing.assert_close(grad, model.w.grad, rtol=1e-4, atol=1e-6)

    # zero advantages and beta 0: zero gradient
    model.zero_grad()
    out = grpo_loss(
        model,
        roll,
        torch.zeros(4),
        steps,
        cond,
        null_cond=None,
        config=cfg.__class__(group_size=2, num_steps=6, train_timesteps=3, guidance_scale=1.0, beta=0.0),
    )
    out.loss.backward()
    assert model.w.grad.abs().max() == 0


def test_reward_errors_name_the_reward_and_the_step():
    with pytest.raises(ValueError, match=r"reward 'clip' at step 7: returned shape \(3,\), expected \(4,\)"):
        check_rewards(torch.ones(3), 4, "clip", 7)
    with pytest.raises(ValueError, match=r"reward 'r' at step 2: returned 1 non-finite"):
        check_rewards(torch.tensor([1.0, float("nan")]), 2, "r", 2)
    torch.testing.assert_close(check_rewards([0.5, 1], 2, "r", 0), torch.tensor([0.5, 1.0]))


def test_config_ranges_name_the_key():
    with pytest.raises(ValueError, match="'group_size'"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="'train_timesteps'"):
        GRPOConfig(num_steps=4, train_timesteps=4)
    with pytest.raises(ValueError, match="'clip_range'"):
        GRPOConfig(clip_range=0)
