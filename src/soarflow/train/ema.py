r"""EMA of the trainable weights: :math:`\bar\theta \leftarrow d_n \bar\theta + (1 - d_n)\theta` after every
optimizer step, with :math:`d_n = \min(\text{decay}, (1 + m)/(10 + m))`, :math:`m = n - 1` for the n-th update
(so :math:`d_1 = 0`: the first update copies the weights, and early EMA weights are not dominated by the
initialisation).

This is diffusers' `EMAModel` rule (``use_ema_warmup=False``), and `state_dict` uses its keys, so checkpoints
written with `EMAModel` resume here. It is written out because pretraining the embedded model needs an EMA on the
core install, where diffusers is an optional extra; torch's `swa_utils.AveragedModel` would deep-copy the whole
module (a LoRA run's frozen base weights too). Only parameters with ``requires_grad`` are tracked, so a LoRA run
averages just the adapter weights. Accelerate checkpoints it through `register_for_checkpointing`.

With ``device="cpu"`` (config ``ema_device: cpu``) the shadow weights live in host memory and each update reads the
device parameters across: :math:`\bar\theta_{cpu} \leftarrow \bar\theta_{cpu} - (1 - d_n)(\bar\theta_{cpu} -
\theta_{dev \to cpu})`, the same arithmetic in the same dtype, so the result equals the on-device EMA to float
rounding; the accelerator holds no second copy of the trainable weights (at the cost of one device-to-host copy of
them per optimizer step).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class EMA:
    """Shadow copies of a list of parameters (on their device, or on `device`), averaged by :meth:`step`."""

    def __init__(self, params: list[nn.Parameter], decay: float, device: torch.device | str | None = None):
        self.decay = decay
        self.device = None if device is None else torch.device(device)
        self.optimization_step = 0  # updates done (EMAModel's name, kept for its checkpoints)
        self.shadow_params = [self._here(p) for p in params]
        self._stored: list[torch.Tensor] = []

    def _here(self, p: torch.Tensor) -> torch.Tensor:
        """A detached copy of `p` where the shadow weights live."""
        return p.detach().clone() if self.device is None else p.detach().to(self.device, copy=True)

    def current_decay(self) -> float:
        m = self.optimization_step - 1  # the update being made is number optimization_step
        return 0.0 if m <= 0 else min(self.decay, (1 + m) / (10 + m))

    @torch.no_grad()
    def step(self, params: list[nn.Parameter]) -> None:
        self.optimization_step += 1
        one_minus_decay = 1.0 - self.current_decay()
        for s, p in zip(self.shadow_params, params):
            s.sub_(one_minus_decay * (s - p.detach().to(s.device)))

    @torch.no_grad()
    def copy_to(self, params: list[nn.Parameter]) -> None:
        for s, p in zip(self.shadow_params, params):
            p.copy_(s)

    def store(self, params: list[nn.Parameter]) -> None:
        self._stored = [self._here(p) for p in params]

    @torch.no_grad()
    def restore(self, params: list[nn.Parameter]) -> None:
        for s, p in zip(self._stored, params):
            p.copy_(s)
        self._stored = []

    def state_dict(self) -> dict[str, Any]:
        """Whole tensors: FSDP2 shards are gathered (every process calls it), so a checkpoint holds the same EMA
        whatever the sharding."""
        from .distributed import full_tensor

        shadow = [full_tensor(s) for s in self.shadow_params]
        return {"decay": self.decay, "optimization_step": self.optimization_step, "shadow_params": shadow}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state["shadow_params"]
        if len(shadow) != len(self.shadow_params):
            raise ValueError(f"EMA state holds {len(shadow)} parameters, the model has {len(self.shadow_params)}")
        self.decay = float(state["decay"])
        self.optimization_step = int(state["optimization_step"])
        from .distributed import copy_full_into

        for s, saved in zip(self.shadow_params, shadow):
            copy_full_into(s, saved)  # each process keeps its shard of a sharded parameter's EMA


def create_ema(model: nn.Module, decay: float, device: str | None = None) -> EMA:
    """An EMA of `model`'s trainable parameters; the shadow copies live on the parameters' device, or on `device`
    (config ``ema_device``: ``cpu``; ``accelerator`` or None: the parameters' device). The trainer builds it after
    ``accelerator.prepare``: under FSDP2 each process then averages its own shards (the update is elementwise, so
    the shards' EMAs are the shards of the whole EMA)."""
    return EMA(trainable_parameters(model), decay=decay, device=None if device in (None, "accelerator") else device)


def update_ema(ema: EMA, model: nn.Module) -> None:
    ema.step(trainable_parameters(model))


def copy_ema_to(ema: EMA, model: nn.Module) -> None:
    """Overwrite `model`'s trainable weights with the EMA weights."""
    ema.copy_to(trainable_parameters(model))


@contextlib.contextmanager
def ema_weights(ema: EMA | None, model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily swap the EMA weights into `model` (e.g. for validation); the training weights come back after."""
    if ema is None:
        yield model
        return
    params = trainable_parameters(model)
    ema.store(params)
    ema.copy_to(params)
    try:
        yield model
    finally:
        ema.restore(params)
