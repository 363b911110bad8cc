"""Tiny velocity models for the core tests."""

import torch
from torch import nn


class ToyVelocity(nn.Module):
    """v = MLP([x, sigma, cond]) for flat x of shape (B, D) and cond (B, C); non-linear in x and sigma."""

    def __init__(self, dim: int = 6, cond_dim: int = 3, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1 + cond_dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, x, sigma, cond):
        return self.net(torch.cat([x, sigma[:, None].to(x.dtype), cond.to(x.dtype)], dim=1))


class RecordingModel(nn.Module):
    """Wraps a model and records (rows, grad enabled, inputs) of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, x, sigma, cond):
        self.calls.append(
            {
                "rows": x.shape[0],
                "grad": torch.is_grad_enabled(),
                "x": x.detach().clone(),
                "sigma": sigma.detach().clone(),
            }
        )
        return self.inner(x, sigma, cond)
