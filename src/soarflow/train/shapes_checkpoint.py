"""Which weights a path given to ``eval-shapes --checkpoint`` (or the demo's ``--base``) means, for task "shapes".

The rule, first match wins:

1. ``base``: the shipped base model;
2. a file: a saved model checkpoint (``*.safetensors``), loaded by :func:`load_shapes_model`;
3. a run folder (``config.yaml`` inside): its final model (``model.safetensors`` / ``model``) if the run finished,
   else its newest ``checkpoint-N``;
4. a ``checkpoint-N`` folder (``trainable_params.safetensors`` inside, the run's ``config.yaml`` one level up):
   the run's model is rebuilt from that config (its ``model.pretrained`` base) and the checkpoint's trainable
   weights are loaded into it.

Anything else is a one-line error naming the path. Unreadable files are a ValueError naming the file.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..models.embedded import load_shapes_model
from ..tasks.registry import build_task
from .checkpoint import CONFIG_FILE, TRAINABLE_FILE, find_final_model, list_checkpoints
from .config import load_config


def describe(path: str | Path) -> tuple[str, Path]:
    """('base' | 'file' | 'checkpoint', resolved path) by the rule above; FileNotFoundError/ValueError otherwise."""
    if str(path) == "base":
        return "base", Path("base")
    p = Path(path)
    if p.is_file():
        return "file", p
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if not p.is_dir():
        raise ValueError(f"checkpoint {p} is neither a file nor a folder")
    if (p / CONFIG_FILE).is_file():
        final = find_final_model(p)
        if final is not None:
            return ("file", final) if final.is_file() else describe(final)
        found = list_checkpoints(p)
        if found:
            return "checkpoint", found[-1]
        raise FileNotFoundError(f"checkpoint {p}: the run folder holds neither a final model nor a checkpoint-N")
    if (p / TRAINABLE_FILE).is_file():
        if not (p.parent / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"checkpoint {p}: {p.parent / CONFIG_FILE} (the run's config) is missing")
        return "checkpoint", p
    raise FileNotFoundError(
        f"checkpoint {p}: not a model file, a run folder ({CONFIG_FILE}) or a checkpoint-N folder ({TRAINABLE_FILE})"
    )


def load_shapes_checkpoint(path: str | Path) -> nn.Module:
    """The model `path` means (module docstring). Errors are ValueError / FileNotFoundError naming the path."""
    kind, resolved = describe(path)
    if kind == "base":
        return load_shapes_model("base")
    if kind == "file":
        try:
            return load_shapes_model(resolved)
        except (ValueError, FileNotFoundError) as err:
            if str(resolved) in str(err):
                raise
            raise (FileNotFoundError if isinstance(err, FileNotFoundError) else ValueError)(
                f"{resolved}: {err}"
            ) from None
        except Exception as err:  # a damaged file can fail in many ways inside the loader (bad JSON metadata, ...)
            raise ValueError(
                f"{resolved} is not a readable shapes model checkpoint ({type(err).__name__}: {err})"
            ) from None
    return _load_training_checkpoint(resolved)


def _load_training_checkpoint(folder: Path) -> nn.Module:
    from safetensors.torch import load_file

    cfg = load_config(folder.parent / CONFIG_FILE)
    if cfg.task != "shapes":
        raise ValueError(f"checkpoint {folder} belongs to a {cfg.task!r} run, not a shapes model")
    model = build_task(cfg).build_model()
    path = folder / TRAINABLE_FILE
    try:
        state = load_file(str(path))
    except Exception as err:  # truncated / garbage files raise several types
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    params = dict(model.named_parameters())
    bad = [k for k in state if k not in params or params[k].shape != state[k].shape]
    if bad:
        raise ValueError(f"{path} does not match the model of {folder.parent / CONFIG_FILE}: {bad[:5]}")
    model.load_state_dict(state, strict=False)
    return model
