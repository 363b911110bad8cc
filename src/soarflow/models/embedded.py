"""Checkpoints of the embedded models (U-Net, MMDiT): one safetensors file, the architecture in its metadata.

A file holds the weights plus ``{"format": "soarflow.<architecture>/1", "config": <json of the config>}``, so a
checkpoint alone rebuilds its model (`load_checkpoint`). Errors always name the file. `load_shapes_model("base")`
loads the shipped base (produced by `soarflow pretrain`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from . import mmdit, unet

# architecture name -> (model class, config class, checkpoint format tag)
ARCHITECTURES: dict[str, tuple[type[nn.Module], type, str]] = {
    "unet": (unet.UNet, unet.UNetConfig, unet.CHECKPOINT_FORMAT),
    "mmdit": (mmdit.MMDiT, mmdit.MMDiTConfig, mmdit.CHECKPOINT_FORMAT),
}
_BY_FORMAT = {fmt: name for name, (_, _, fmt) in ARCHITECTURES.items()}
BASE_CHECKPOINT = "base_shapes.safetensors"  # the shipped base, in soarflow/assets


def architecture_of(model: nn.Module) -> str:
    for name, (cls, _, _) in ARCHITECTURES.items():
        if isinstance(model, cls):
            return name
    raise ValueError(f"{type(model).__name__} is not an embedded architecture ({', '.join(ARCHITECTURES)})")


def build_model(architecture: str, config: Mapping[str, Any]) -> nn.Module:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    cls, config_cls, _ = ARCHITECTURES[architecture]
    return cls(config_cls.from_dict(config))


def save_checkpoint(model: nn.Module, path: str | Path, extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Write weights as safetensors with the architecture and its config in the header metadata (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = ARCHITECTURES[architecture_of(model)][2]
    meta = {"format": fmt, "config": json.dumps(asdict(model.config))}
    meta.update(extra_metadata or {})
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)  # a crash never leaves a half-written checkpoint under the real name
    return path


def read_checkpoint(path: str | Path) -> tuple[str, Any, dict[str, torch.Tensor], dict[str, str]]:
    """(architecture, config, state_dict, metadata) of a checkpoint, with errors that name the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedded model checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated/garbage files
        raise ValueError(f"{path} is not a readable safetensors checkpoint ({e})") from e
    architecture = _BY_FORMAT.get(meta.get("format", ""))
    if architecture is None or "config" not in meta:
        raise ValueError(f"{path} is not a soarflow embedded-model checkpoint (metadata format={meta.get('format')!r})")
    try:
        config = ARCHITECTURES[architecture][1].from_dict(json.loads(meta["config"]))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: bad {architecture} config in the metadata ({e})") from e
    return architecture, config, state, meta


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path = "<state>") -> None:
    """Load a full state dict, refusing (and naming the file) on any missing, extra or reshaped tensor."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad:
        raise ValueError(
            f"{path} does not match this {type(model).__name__}: missing={missing[:5]} "
            f"unexpected={unexpected[:5]} shape mismatch={bad[:5]}"
        )
    model.load_state_dict(state)


def load_checkpoint(path: str | Path) -> nn.Module:
    architecture, config, state, _ = read_checkpoint(path)
    model = ARCHITECTURES[architecture][0](config)
    load_state(model, state, path)
    return model


def base_checkpoint_path() -> Path:
    """The shipped, pretrained base model (produced by `soarflow pretrain`, see its JSON manifest)."""
    return Path(str(resources.files("soarflow") / "assets" / BASE_CHECKPOINT))


def resolve_checkpoint(path_or_name: str | Path) -> Path:
    if str(path_or_name) == "base":
        return base_checkpoint_path()
    return Path(path_or_name)


def load_shapes_model(path_or_name: str | Path = "base") -> nn.Module:
    """An embedded model (U-Net or MMDiT) from a safetensors checkpoint path, or "base" for the shipped base."""
    return load_checkpoint(resolve_checkpoint(path_or_name))
