"""manifest.json: how a final model was made and what it scores (``write_manifest: true``). The shipped base's
manifest, src/soarflow/assets/base_shapes.json, is one: its command reproduces the base."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig, resolved_for_device

MANIFEST_FILE = "manifest.json"


def final_loss_ema(history: list[dict[str, float]], beta: float = 0.98) -> float | None:
    """The logged training loss smoothed as :math:`\\bar l \\leftarrow \\beta \\bar l + (1 - \\beta) l`."""
    running = None
    for entry in history:
        running = entry["loss"] if running is None else beta * running + (1 - beta) * entry["loss"]
    return running


def write_manifest(cfg: Any, result: Any, task: Any, command: str, args: dict[str, Any] | None = None) -> Path:
    """Write ``output_dir/manifest.json`` for a finished run: the command, its flags (``args``, if the command has
    its own) and config, steps, parameters, smoothed final loss, wall clock, machine, and the task's evaluation of
    the final model (``task.manifest_evaluation(model)``, e.g. ShapesEval)."""
    model = result.model
    device = next(model.parameters()).device
    manifest: dict[str, Any] = {"command": command}
    if args is not None:
        manifest["args"] = args
    manifest.update(
        {
            "config": (resolved_for_device(cfg, device) if isinstance(cfg, TrainConfig) else cfg).to_dict(),
            "steps": result.global_step,
            "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss_ema": final_loss_ema(result.history),
            "wall_clock_s": round(result.wall_time_s, 1),
            "machine": f"{platform.machine()} {platform.system()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
            + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        }
    )
    if task is not None:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            manifest.update(task.manifest_evaluation(model))
    path = Path(result.output_dir) / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
