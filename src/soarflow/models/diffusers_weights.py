"""A trained diffusers transformer on disk: ``transformer/`` (``save_pretrained``) for a full fine-tune, or
``pytorch_lora_weights.safetensors`` for LoRA, plus ``soarflow_model.json`` (the manifest) naming the base
pipeline, so that ``soarflow sample`` (or ``Pipeline.from_pretrained(base, transformer=...)`` /
``pipe.load_lora_weights``) rebuilds a pipeline.

:class:`SaveOptions` adds the other shapes of :mod:`.diffusers_export`: the weights in bf16 / fp16, a single-file
``{family}_transformer.safetensors`` beside ``transformer/``, and ``comfyui_lora.safetensors`` beside the LoRA."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .diffusers_export import SAVE_DTYPES, lora_to_comfyui, save_single_file, save_transformer
from .lora import has_lora, load_lora, save_lora

MANIFEST = "soarflow_model.json"
COMFYUI_LORA = "comfyui_lora.safetensors"


@dataclass(frozen=True)
class SaveOptions:
    """How the model folder is written (the diffusers tasks' ``model.save_*`` keys)."""

    family: str = ""
    save_dtype: str = "fp32"  # fp32 | bf16 | fp16: the saved transformer / adapter weights
    single_file: bool = False  # full fine-tune: also {family}_transformer.safetensors
    comfyui_lora: bool = False  # LoRA: also comfyui_lora.safetensors

    def single_file_name(self) -> str:
        return f"{self.family}_transformer.safetensors"


def save_model_folder(
    path: Path, transformer: nn.Module, pipeline_class: type, manifest: dict, options: SaveOptions = SaveOptions()
) -> Path:
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
        save_lora(pipeline_class, transformer, tmp, dtype=SAVE_DTYPES[options.save_dtype])
        if options.comfyui_lora:
            _save_comfyui_lora(transformer, tmp / COMFYUI_LORA, options.save_dtype)
    else:
        save_transformer(transformer, tmp / "transformer", options.save_dtype)
        if options.single_file:
            save_single_file(options.family, transformer, tmp / options.single_file_name(), options.save_dtype)
    (tmp / MANIFEST).write_text(json.dumps({**manifest, "save_dtype": options.save_dtype}, indent=1))
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


def _save_comfyui_lora(transformer: nn.Module, path: Path, save_dtype: str) -> None:
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from .diffusers_export import cast_floats

    state = cast_floats(get_peft_model_state_dict(transformer), SAVE_DTYPES[save_dtype])
    save_file(lora_to_comfyui(state, transformer.peft_config["default"].lora_alpha), str(path))


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
