"""A trained diffusers transformer on disk: ``transformer/`` (``save_pretrained``) for a full fine-tune, or
``pytorch_lora_weights.safetensors`` for LoRA, plus ``soarflow_model.json`` (the manifest) naming the base
pipeline, so that ``soarflow sample`` (or ``Pipeline.from_pretrained(base, transformer=...)`` /
``pipe.load_lora_weights``) rebuilds a pipeline."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from torch import nn

from .lora import has_lora, load_lora, save_lora

MANIFEST = "soarflow_model.json"


def save_model_folder(path: Path, transformer: nn.Module, pipeline_class: type, manifest: dict) -> Path:
    """Write the folder. Replaces an earlier soarflow model in `path` (resumed run); refuses any other non-empty
    folder."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not (path / MANIFEST).is_file():
        raise ValueError(f"save_model: {path} is not empty and holds no soarflow model; refusing to overwrite it")
    # Write next to the target and swap at the end, so a crash never leaves a half-written model and an
    # earlier model of this run (resumed training) is replaced only by a complete one.
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if has_lora(transformer):
        save_lora(pipeline_class, transformer, tmp)
    else:
        transformer.save_pretrained(tmp / "transformer")
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if path.exists():
        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return path


def load_model_folder(path: Path, transformer: nn.Module, pipeline_class: type, transformer_class: type) -> None:
    """Inverse of `save_model_folder`, into an already built transformer (with its LoRA adapter for LoRA)."""
    path = Path(path)
    if has_lora(transformer):
        load_lora(pipeline_class, transformer, path)
        return
    folder = path / "transformer"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no full transformer weights in {path} (expected {folder}/config.json)")
    loaded = transformer_class.from_pretrained(str(folder))
    missing, unexpected = transformer.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
