"""bench/official_loop.py (the release's loop, ported as the GPU anchor) computes SOAR's gradient with the
release's call structure: a 2B-row rollout with autograd on, then B-row forward+backward per term."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from soarflow import SOARConfig, soar_loss
from soarflow.flow import shift_sigma

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "official_loop.py"
B, D, C, K = 4, 6, 3, 3


def load():
    spec = importlib.util.spec_from_file_location("official_loop", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D + 1 + C, 16), nn.Tanh(), nn.Linear(16, D))
        self.calls = []

    def forward(self, x, sigma, cond):
        self.calls.append((x.shape[0], torch.is_grad_enabled()))
        return self.net(torch.cat([x, sigma[:, None], cond], dim=1))


def draws(rollout_steps, shift):
    g = torch.Generator().manual_seed(0)
    x0, cond, noise = torch.randn(B, D, generator=g), torch.randn(B, C, generator=g), torch.randn(B, D, generator=g)
    t = torch.rand(B, generator=g) * 0.9 + 0.05
    s1 = shift_sigma((t - 1 / rollout_steps).clamp_min(0), shift)
    aux = s1 + torch.rand(K, B, generator=g) * (1 - s1)
    return x0, cond, torch.zeros(1, C), noise, t, aux


@pytest.mark.parametrize("guidance", [4.5, 1.0])
def test_the_ported_loop_has_soarflows_loss_and_gradient(guidance):
    official = load()
    torch.manual_seed(0)
    model = Toy()
    x0, cond, null, noise, t, aux = draws(8, 3.0)
    loss = official.official_step(
        model,
        x0,
        cond,
        null,
        num_aux=K,
        guidance_scale=guidance,
        rollout_steps=8,
        shift=3.0,
        noise=noise,
        t=t,
        aux_sigmas=aux,
    )
    # the release's structure: rollout (2B rows with CFG, autograd on), base term, K aux terms of B rows
    assert model.calls == [(2 * B if guidance != 1 else B, True)] + [(B, True)] * (1 + K)
    ported = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    cfg = SOARConfig(num_aux=K, rollout_steps=8, guidance_scale=guidance, shift=3.0)
    ref = soar_loss(model, x0, cond, null_cond=null, config=cfg, noise=noise, t=t, aux_sigmas=aux)
    ref.loss.backward()
    torch.testing.assert_close(loss, ref.loss.detach(), rtol=1e-6, atol=1e-7)
    for g_port, p in zip(ported, model.parameters()):
        torch.testing.assert_close(g_port, p.grad, rtol=1e-5, atol=1e-7)


def test_random_draws_run_and_give_a_finite_loss():
    official = load()
    model = Toy()
    x0, cond, null, *_ = draws(40, 3.0)
    loss = official.official_step(model, x0, cond, null, num_aux=K, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
