"""GRPO as the Flow-GRPO release computes it: its KL term and its advantages, checked against one release step
worked out by hand here (plain Python arithmetic, independent of soarflow's implementation)."""

from __future__ import annotations

import math

import pytest
import torch

from soarflow.methods.grpo import (
    GRPOConfig,
    group_advantages,
    grpo_loss,
    kl_scale,
    prompt_advantages,
    sample_with_log_probs,
)
from soarflow.train.methods import SHAPES_RECIPES


def _pstd(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


# ---------------------------------------------------------------------------------------------- advantages

NEAR_TIE = [1.0, 1.0, 1.0, 0.99]  # issue 22's example: a partial-credit reward with a near-tie
OTHER = [0.5, 0.5, 1.0, 0.5]


def test_global_std_advantages_of_a_near_tie_are_small_as_in_the_release():
    prompts = ["a"] * 4 + ["b"] * 4
    rewards = NEAR_TIE + OTHER
    # the release: per-prompt mean, std of ALL rewards of the batch (np.std, population) + 1e-4, clip +-5
    std = _pstd(rewards)
    assert std == pytest.approx(0.24111395, abs=1e-8)
    expected = [(r - sum(NEAR_TIE) / 4) / (std + 1e-4) for r in NEAR_TIE]
    expected += [max(-5.0, min(5.0, (r - sum(OTHER) / 4) / (std + 1e-4))) for r in OTHER]
    adv = prompt_advantages(prompts, torch.tensor(rewards), clip=5.0, global_std=True)
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=1e-7)
    # about [0.01, 0.01, 0.01, -0.03]: a near-tie stays a near-tie
    assert adv[:4].tolist() == pytest.approx([0.010364, 0.010364, 0.010364, -0.031093], abs=1e-6)
    # the positional form gives the same numbers for consecutive groups
    torch.testing.assert_close(group_advantages(torch.tensor(rewards), 4, 5.0, global_std=True), adv)


def test_per_group_std_turns_the_near_tie_into_full_size_advantages():
    adv = prompt_advantages(["a"] * 4, torch.tensor(NEAR_TIE), clip=5.0, global_std=False)
    std = _pstd(NEAR_TIE)  # 0.00433
    expected = [(r - 0.9975) / (std + 1e-4) for r in NEAR_TIE]
    assert expected == pytest.approx([0.5643, 0.5643, 0.5643, -1.6930], abs=1e-4)  # the issue's [0.56, ..., -1.69]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_prompt_advantages_key_groups_by_prompt_text_wherever_the_rows_are_and_clip():
    # prompt "a" appears in two places of the batch: one group of 4 (the release's stat tracker keys by text)
    prompts = ["a", "b", "a", "b", "a", "c", "a", "c"]
    rewards = [0.0, 3.0, 1.0, 3.0, 0.0, 0.0, 1.0, 100.0]
    adv = prompt_advantages(prompts, torch.tensor(rewards), clip=1.5)
    a = [0.0, 1.0, 0.0, 1.0]
    ref_a = [(r - 0.5) / (_pstd(a) + 1e-4) for r in a]
    assert adv[[0, 2, 4, 6]].tolist() == pytest.approx(ref_a, abs=1e-5)
    assert adv[1] == 0 and adv[3] == 0  # equal rewards: no signal
    assert adv[[5, 7]].tolist() == pytest.approx([-50 / 50.0001, 50 / 50.0001], abs=1e-6)  # c's own std
    # global std (32.7): c's +-50 / 32.7 = +-1.53 is clipped to +-1.5
    glob = prompt_advantages(prompts, torch.tensor(rewards), clip=1.5, global_std=True)
    assert _pstd(rewards) == pytest.approx(32.7, abs=0.05)
    assert glob[5] == -1.5 and glob[7] == 1.5
    assert glob[0].item() == pytest.approx(-0.5 / (_pstd(rewards) + 1e-4), rel=1e-6)
    with pytest.raises(ValueError, match="one per prompt"):
        prompt_advantages(["a", "b"], torch.ones(3), clip=5.0)


def test_shapes_recipe_uses_the_global_std_and_the_release_kl():
    import yaml
    from pathlib import Path

    assert SHAPES_RECIPES["grpo"]["grpo.global_std"] is True
    assert SHAPES_RECIPES["grpo"]["grpo.kl_form"] == "release"
    recipe = yaml.safe_load((Path(__file__).parents[2] / "configs" / "shapes_grpo.yaml").read_text())
    assert recipe["grpo"]["global_std"] is True and recipe["grpo"]["kl_form"] == "release"
    assert GRPOConfig().kl_form == "release" and GRPOConfig().global_std is True  # the release's defaults
    with pytest.raises(ValueError, match="'kl_form'"):
        GRPOConfig(kl_form="exact")


# ---------------------------------------------------------------------------------------------- KL


def test_kl_scale_is_std_dev_t_without_the_step_size():
    s, sn, a = torch.tensor([0.5, 1.0]), torch.tensor([0.4, 0.9]), 0.7
    g = [a * math.sqrt(0.5 / 0.5), a * math.sqrt(1.0 / (1 - 0.9))]  # at sigma = 1 the release uses sigmas[1]
    step_std = torch.tensor([g[0] * math.sqrt(0.1), g[1] * math.sqrt(0.1)]).view(2, 1, 1)
    rel = kl_scale("flow_sde", step_std, s, sn, "release")
    assert rel.flatten().tolist() == pytest.approx(g, rel=1e-6)
    assert kl_scale("flow_sde", step_std, s, sn, "exact_gaussian") is step_std
    assert kl_scale("cps", step_std, s, sn, "release") is step_std  # the release's cps std_dev_t is the step std


class Linear(torch.nn.Module):
    """v = W x + c sigma + cond."""

    def __init__(self, dim=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(dim, dim, generator=g) * 0.3)
        self.c = torch.nn.Parameter(torch.randn(dim, generator=g) * 0.3)

    def forward(self, x, sigma, cond):
        return x @ self.w.T + sigma[:, None] * self.c + cond


def _release_mean(model, x, sigma, sigma_next, sigma_max, cond, w, a):
    """One release flow_sde mean, written as sd3_sde_with_logprob does, for one row (lists of floats)."""
    xs = torch.tensor([x])
    sig = torch.tensor([sigma])
    with torch.no_grad():
        v_c = model(xs, sig, torch.tensor([cond]))[0].tolist()
        v_u = model(xs, sig, torch.zeros(1, len(x)))[0].tolist()
    v = [u + w * (c - u) for u, c in zip(v_u, v_c)]
    std_dev_t = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * a
    dt = sigma_next - sigma
    mean = [
        xi * (1 + std_dev_t**2 / (2 * sigma) * dt) + vi * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        for xi, vi in zip(x, v)
    ]
    return mean, std_dev_t, dt


@pytest.mark.parametrize("form", ["release", "exact_gaussian"])
def test_kl_term_matches_a_release_step_by_hand(form):
    policy, ref = Linear(seed=1), Linear(seed=2)
    cfg = GRPOConfig(group_size=2, num_steps=4, train_timesteps=1, guidance_scale=2.0, beta=0.04, kl_form=form)
    cond = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.5, -0.4]])
    null = torch.zeros(1, 3)
    roll = sample_with_log_probs(
        policy,
        torch.randn(2, 3, generator=torch.Generator().manual_seed(3)),
        cond,
        null_cond=null,
        config=cfg,
        shift=1.0,
        generator=torch.Generator().manual_seed(4),
    )
    steps = torch.tensor([[0, 2]])  # image 0 trained at sigma 1 -> 0.75, image 1 at 0.5 -> 0.25
    out = grpo_loss(policy, roll, torch.zeros(2), steps, cond, null_cond=null, config=cfg, reference=ref)
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.0]
    kls = []
    for b, i in enumerate([0, 2]):
        x = roll.states[i, b].tolist()
        mu, g, dt = _release_mean(policy, x, sigmas[i], sigmas[i + 1], sigmas[1], cond[b].tolist(), 2.0, 0.7)
        mu_ref, _, _ = _release_mean(ref, x, sigmas[i], sigmas[i + 1], sigmas[1], cond[b].tolist(), 2.0, 0.7)
        sq = sum((m - r) ** 2 for m, r in zip(mu, mu_ref)) / 3
        # release: mean_d (mu - mu_ref)^2 / (2 std_dev_t^2); exact: the step std std_dev_t sqrt(-dt)
        kls.append(sq / (2 * g**2) if form == "release" else sq / (2 * g**2 * -dt))
    expected = sum(kls) / 2
    assert float(out.kl) == pytest.approx(expected, rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(0.04 * expected, rel=1e-5)  # zero advantages: the KL term alone


def test_chunked_loss_forward_gives_the_same_loss_and_gradient():
    model = Linear(seed=5)
    base = dict(group_size=2, num_steps=5, train_timesteps=3, guidance_scale=2.0, beta=0.0)
    cond, null = torch.randn(4, 3, generator=torch.Generator().manual_seed(6)), torch.zeros(1, 3)
    roll = sample_with_log_probs(
        model,
        torch.randn(4, 3, generator=torch.Generator().manual_seed(7)),
        cond,
        null_cond=null,
        config=GRPOConfig(**base),
        shift=1.0,
        generator=torch.Generator().manual_seed(8),
    )
    steps = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 0, 1]])
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    grads, losses = [], []
    for chunk in (None, 5):  # 3 x 4 x 2 = 24 rows in chunks of 5
        model.zero_grad()
        out = grpo_loss(model, roll, adv, steps, cond, null_cond=null, config=GRPOConfig(**base, chunk_size=chunk))
        out.loss.backward()
        losses.append(float(out.loss.detach()))
        grads.append(model.w.grad.clone())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0
    with pytest.raises(ValueError, match="'chunk_size'"):
        GRPOConfig(chunk_size=0)
