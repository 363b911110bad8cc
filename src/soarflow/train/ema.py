"""EMA of the trainable weights, on diffusers' `EMAModel`.

`EMAModel` averages :math:`\\bar\\theta \\leftarrow d_n \\bar\\theta + (1 - d_n)\\theta` after every optimizer step
with :math:`d_n = \\min(\\text{decay}, (1 + n)/(10 + n))` (a built-in warm-up, so early EMA weights are not
dominated by the initialisation). Only parameters with ``requires_grad`` are tracked, so a LoRA run averages
just the adapter weights. `EMAModel` has `state_dict`/`load_state_dict`, so accelerate checkpoints it with
`register_for_checkpointing`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel
else:
    EMAModel = Any


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def create_ema(model: nn.Module, decay: float) -> EMAModel:
    """An EMA of `model`'s trainable parameters (shadow copies live on the parameters' device)."""
    try:
        from diffusers.training_utils import EMAModel
    except ImportError:
        raise ValueError("use_ema needs diffusers (pip install 'soarflow[diffusers]'), or set use_ema: false") from None
    return EMAModel(trainable_parameters(model), decay=decay)


def update_ema(ema: EMAModel, model: nn.Module) -> None:
    ema.step(trainable_parameters(model))


def copy_ema_to(ema: EMAModel, model: nn.Module) -> None:
    """Overwrite `model`'s trainable weights with the EMA weights."""
    ema.copy_to(trainable_parameters(model))


@contextlib.contextmanager
def ema_weights(ema: EMAModel | None, model: nn.Module) -> Iterator[nn.Module]:
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
