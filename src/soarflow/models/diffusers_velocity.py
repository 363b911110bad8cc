"""A diffusers transformer as a velocity model ``model(x, sigma, cond) -> v``: the base of the family wrappers
(`soarflow.tasks.sd3.SD3Velocity`, `soarflow.tasks.flux.FluxVelocity`), which map sigma and the condition to the
transformer's own inputs."""

from __future__ import annotations

import torch
from torch import nn


class VelocityModule(nn.Module):
    """Base of the velocity wrappers: holds ``self.transformer``; forwards gradient checkpointing to it."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype the transformer's (frozen or trainable) base weights are stored in; inputs are cast to it."""
        for name, p in self.transformer.named_parameters():
            if "lora_" not in name:
                return p.dtype
        return torch.float32
