"""LoRA adapters on a diffusers transformer through peft, saved in the format diffusers pipelines load.

``add_lora`` freezes the transformer and adds a peft ``LoraConfig`` adapter (named ``default``) on the
attention projections: ``to_q/to_k/to_v/to_out.0`` of the image stream and ``add_q_proj/add_k_proj/add_v_proj/
to_add_out`` of the caption stream (MMDiT joint attention). The adapter computes
:math:`W x + \\tfrac{\\alpha}{r} B A x` with :math:`B = 0` at initialisation, so training starts from the base model.

``save_lora`` writes ``pytorch_lora_weights.safetensors`` with the pipeline class's ``save_lora_weights``
(keys prefixed ``transformer.``, the adapter config stored as metadata so alpha survives), which
``pipeline.load_lora_weights(folder)`` reads back; ``load_lora`` is the inverse into an adapted transformer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass
class LoraSection:
    """``model.lora:`` — used when ``model.finetune`` is ``lora``."""

    rank: int = 16
    alpha: float | None = None  # None: alpha = rank (scale 1)
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    init: Literal["gaussian", "default"] = "gaussian"  # peft init of A (B is zero either way)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"config key 'rank': must be an integer >= 1 (got {self.rank!r})")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"config key 'alpha': must be > 0 or null (got {self.alpha!r})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"config key 'dropout': must be in [0, 1) (got {self.dropout!r})")
        if not self.target_modules:
            raise ValueError("config key 'target_modules': must name at least one module")
        if self.init not in ("gaussian", "default"):
            raise ValueError(f"config key 'init': must be gaussian or default (got {self.init!r})")


def add_lora(transformer: nn.Module, section: LoraSection) -> None:
    """Freeze `transformer` and add the LoRA adapter; only the adapter's A/B matrices require grad."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    config = LoraConfig(
        r=section.rank,
        lora_alpha=section.alpha if section.alpha is not None else section.rank,
        lora_dropout=section.dropout,
        init_lora_weights=True if section.init == "default" else "gaussian",
        target_modules=list(section.target_modules),
    )
    try:
        transformer.add_adapter(config)
    except ValueError as err:
        raise ValueError(
            f"config key 'model.lora.target_modules': {list(section.target_modules)} do not match "
            f"modules of {type(transformer).__name__} ({err})"
        ) from None


def has_lora(transformer: nn.Module) -> bool:
    return bool(getattr(transformer, "peft_config", None))


def save_lora(pipeline_class: type, transformer: nn.Module, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the adapter of `transformer` into folder `path` for ``pipeline.load_lora_weights(path)`` (its weights
    cast to `dtype` if given)."""
    from peft.utils import get_peft_model_state_dict

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(transformer)
    if dtype is not None:
        state = {k: v.detach().to(dtype) for k, v in state.items()}
    metadata = transformer.peft_config["default"].to_dict()
    pipeline_class.save_lora_weights(
        str(path),
        transformer_lora_layers=state,
        weight_name=LORA_WEIGHTS,
        transformer_lora_adapter_metadata=metadata,
    )
    return path / LORA_WEIGHTS


def load_lora(pipeline_class: type, transformer: nn.Module, path: str | Path) -> None:
    """Load `save_lora`'s file (or any diffusers LoRA file for this family) into the adapter of `transformer`."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    path = Path(path)
    file = path / LORA_WEIGHTS if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"LoRA weights not found: {file}")
    state = pipeline_class.lora_state_dict(str(file.parent), weight_name=file.name)
    if isinstance(state, tuple):  # some versions also return metadata / network alphas
        state = state[0]
    prefix = "transformer."
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{file} holds no transformer LoRA weights")
    result = set_peft_model_state_dict(transformer, convert_unet_state_dict_to_peft(state), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"{file} does not match the model's LoRA adapter: unexpected keys {unexpected[:5]}")
