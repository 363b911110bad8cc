"""Resumable checkpoints (``output_dir/checkpoint-{step}``) and output-folder safety.

A checkpoint is written by ``accelerator.save_state`` (optimizer, LR scheduler, grad scaler, every process's
RNG states, the EMA and any other object registered for checkpointing) into ``checkpoint-{step}.tmp`` and
renamed when complete, so a crash while saving never leaves a half-written ``checkpoint-{step}``. The model
itself is stored as ``trainable_params.safetensors``: only parameters with ``requires_grad`` (all of them for
full fine-tuning, just the adapters for LoRA) — frozen weights come back from ``task.build_model()``.
``trainer_state.json`` holds the step counter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import LOCATION_KEYS, NON_DEFINING_KEYS, TrainConfig, config_differences, upgrade_former_names

CHECKPOINT_PREFIX = "checkpoint-"
TRAINABLE_FILE = "trainable_params.safetensors"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
MODEL_DIR = "model"
_CKPT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


# ---------------------------------------------------------------------------------------------- finding


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first (by step)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str | Path, spec: str | None) -> Path | None:
    """The checkpoint folder to resume from: None (fresh run), 'latest' (None if there is none yet) or a path
    (absolute, relative to the working directory, or a folder name inside `output_dir`)."""
    if spec is None:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    for candidate in (Path(spec), Path(output_dir) / spec):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"resume_from_checkpoint: checkpoint folder not found: {spec} "
        f"(looked in the working directory and in {output_dir})"
    )


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE_FILE
    try:
        state = json.loads(path.read_text())
        int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"checkpoint {checkpoint} is corrupt or incomplete: cannot read {STATE_FILE} ({err})"
        ) from None
    return state


def is_finite_checkpoint(checkpoint: Path) -> bool:
    """Whether the trainer verified the checkpoint's weights as finite when saving it (``"finite": true`` in
    trainer_state.json; checkpoints of older versions lack the mark)."""
    try:
        return json.loads((checkpoint / STATE_FILE).read_text()).get("finite") is True
    except (OSError, ValueError, AttributeError):
        return False


def prune_checkpoints(output_dir: str | Path, limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that at most `limit` remain, except the newest checkpoint with verified
    finite weights, which is always kept; returns the deleted folders."""
    if limit is None:
        return []
    found = list_checkpoints(output_dir)
    doomed = found[: max(0, len(found) - limit)]
    finite = [p for p in found if is_finite_checkpoint(p)]
    if finite:
        doomed = [p for p in doomed if p != finite[-1]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


# ---------------------------------------------------------------------------------------------- output dir


def _auto_as_recorded(current: dict, previous: dict) -> dict:
    """``soar.reuse_main_output: auto`` matches the layout a run recorded (config.yaml holds it resolved for the
    device the run started on): the same command may rerun or resume the run. On the same device type it resolves
    to the same layout; on another one the trainer records the switch (config.N.yaml)."""
    soar, recorded = current.get("soar") or {}, (previous.get("soar") or {}).get("reuse_main_output")
    if soar.get("reuse_main_output") == "auto" and isinstance(recorded, bool):
        return {**current, "soar": {**soar, "reuse_main_output": recorded}}
    return current


def check_output_dir(config: TrainConfig, resume_from: Path | None) -> None:
    """Refuse to start a run that would mix with (or overwrite) another run's files in `output_dir`.

    * empty / missing folder: fine;
    * a soarflow run (config.yaml) and no resume requested: error — naming the differing keys if the config
      differs, suggesting ``--resume_from_checkpoint latest`` or a new folder if it is the same;
    * resume requested: fine if the defining keys agree (execution keys such as max_train_steps may change);
      a checkpoint of *this* folder with a different config is refused (resume into a new folder instead);
      ``output_dir`` itself is not compared (``runP``, ``runP/``, ``./runP``, an absolute path or a moved run
      are the same run);
    * a non-empty folder that is not a soarflow run: error.
    """
    out = Path(config.output_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"output_dir {out} exists and is not a folder")
    cfg_file = out / CONFIG_FILE
    if not cfg_file.is_file():
        if any(out.iterdir()):
            raise ValueError(
                f"output_dir {out} is not empty and holds no soarflow run ({CONFIG_FILE} missing); "
                "choose a new or empty folder"
            )
        return
    previous = upgrade_former_names(TrainConfig, _read_yaml(cfg_file))  # written before a key was renamed
    ignored = NON_DEFINING_KEYS | LOCATION_KEYS
    diffs = [
        d
        for d in config_differences(previous, _auto_as_recorded(config.to_dict(), previous))
        if d.split(":")[0] not in ignored
    ]
    resume_cmd = f"soarflow train --config {cfg_file} --output_dir {out} --resume_from_checkpoint latest"
    if config.resume_from_checkpoint is None:
        if diffs:
            raise ValueError(
                f"output_dir {out} already holds a different run (differences: {'; '.join(diffs)}); "
                "choose a new output_dir — nothing was changed"
            )
        raise ValueError(
            f"output_dir {out} already holds this run; pass --resume_from_checkpoint latest to continue "
            f"it ({resume_cmd}), or choose a new output_dir — nothing was changed"
        )
    if diffs:
        raise ValueError(
            f"output_dir {out} holds a run with a different config (differences: {'; '.join(diffs)}); "
            f"resume it with its own config ({resume_cmd}), or resume into a new output_dir "
            f"(--resume_from_checkpoint {out.resolve()}/checkpoint-N --output_dir <new folder>)"
        )
    if resume_from is None and find_final_model(out) is not None:
        raise ValueError(
            f"output_dir {out} holds a finished run without checkpoints to resume from; "
            "choose a new output_dir — nothing was changed"
        )


def find_final_model(output_dir: Path) -> Path | None:
    """The final weights `task.save_model(model, output_dir / "model")` wrote: `model` or `model.<ext>`."""
    if (output_dir / MODEL_DIR).exists():
        return output_dir / MODEL_DIR
    found = sorted(output_dir.glob(f"{MODEL_DIR}.*"))
    return found[0] if found else None


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a config mapping")
    return data


# ---------------------------------------------------------------------------------------------- saving


def _named_trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def register_trainable_state_hooks(accelerator: Any, layout: Any = None) -> None:
    """Make ``save_state``/``load_state`` store the model as its trainable parameters only (safetensors).

    With sharded weights (FSDP2, ZeRO-3; `layout` from :func:`soarflow.train.distributed.layout_of`) accelerate
    saves and restores the model's shards itself; the hook still writes the gathered whole trainable tensors (every
    process takes part in the gathering), so that every checkpoint holds them in the same file."""
    from .distributed import layout_of, trainable_state

    layout = layout if layout is not None else layout_of(accelerator)

    def save_hook(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        weights.clear()  # accelerate would otherwise also write the full state dict
        if not (accelerator.is_main_process or layout.sharded):
            return
        tensors = {}
        for i, model in enumerate(models):
            prefix = f"{i}." if len(models) > 1 else ""
            for name, t in trainable_state(accelerator, layout, model).items():
                tensors[prefix + name] = t
        if accelerator.is_main_process:
            save_file(tensors, os.path.join(output_dir, TRAINABLE_FILE))

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        path = Path(input_dir) / TRAINABLE_FILE
        try:
            tensors = load_file(str(path))
        except Exception as err:  # missing / truncated file: safetensors raises several types
            raise ValueError(
                f"checkpoint {input_dir} is corrupt or incomplete: cannot read {path.name} ({err})"
            ) from None
        for i, model in enumerate(models):
            prefix = f"{i}." if len(models) > 1 else ""
            params = _named_trainable(accelerator.unwrap_model(model))
            missing = [n for n in params if prefix + n not in tensors]
            if missing:
                raise ValueError(f"checkpoint {input_dir} does not match the model: missing {missing[:5]}")
            with torch.no_grad():
                for name, p in params.items():
                    t = tensors[prefix + name]
                    if t.shape != p.shape:
                        raise ValueError(
                            f"checkpoint {input_dir} does not match the model: {name} has shape "
                            f"{tuple(t.shape)}, the model {tuple(p.shape)}"
                        )
                    p.copy_(t.to(p.device, p.dtype))
        models.clear()  # loaded here; accelerate must not look for a full state dict

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(
    accelerator: Any, output_dir: Path, global_step: int, limit: int | None, state: dict[str, Any] | None = None
) -> Path:
    """Write ``checkpoint-{global_step}`` atomically (via a .tmp folder), then prune to `limit`. All processes call it.

    The caller has verified the weights are finite; trainer_state.json records that (``"finite": true``) and
    `state` (extra counters)."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{global_step}"
    tmp = output_dir / f"{CHECKPOINT_PREFIX}{global_step}.tmp"
    if accelerator.is_main_process:
        if final.exists():
            raise ValueError(f"checkpoint {final} already exists; refusing to overwrite it")
        if tmp.exists():
            shutil.rmtree(tmp)  # leftover of a crash while saving: never a complete checkpoint
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"global_step": global_step, "finite": True, **(state or {})}))
        os.replace(tmp, final)
        prune_checkpoints(output_dir, limit)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, checkpoint: Path) -> int:
    """Restore everything ``save_checkpoint`` wrote; returns the global step. Errors name the folder."""
    state = read_trainer_state(checkpoint)
    try:
        accelerator.load_state(str(checkpoint))
    except ValueError:
        raise
    except Exception as err:  # truncated/missing optimizer or RNG files: many exception types
        raise ValueError(f"checkpoint {checkpoint} is corrupt or incomplete: {type(err).__name__}: {err}") from None
    return int(state["global_step"])
