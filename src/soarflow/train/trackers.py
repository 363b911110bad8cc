"""Experiment trackers through accelerate's ``log_with``: config ``report_to`` as in diffusers' training scripts.

``report_to``: ``tensorboard`` (event files in ``output_dir/logs``), ``wandb`` (Weights & Biases; its files go to
``output_dir/logs/wandb`` unless ``WANDB_DIR`` is set; ``WANDB_MODE=offline`` runs without a network and
``wandb sync`` uploads later), ``all`` (both) or ``none``. Every logged metric goes to each tracker, and so does
every validation grid: tensorboard's ``add_images`` (one image per prompt, NHWC uint8) and a list of
``wandb.Image`` with the prompt as caption.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}  # name -> (module, package)
REPORT_TO = ("tensorboard", "wandb", "all", "none")


def tracker_names(report_to: str) -> list[str]:
    """The trackers `report_to` names (``all``: tensorboard and wandb)."""
    if report_to == "none":
        return []
    if report_to == "all":
        return list(TRACKERS)
    if report_to not in TRACKERS:
        raise ValueError(f"config key 'report_to': must be one of {', '.join(REPORT_TO)} (got {report_to!r})")
    return [report_to]


def check_installed(report_to: str) -> None:
    """Fail before any work when a named tracker's package is missing."""
    for name in tracker_names(report_to):
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(
                f"config key 'report_to': {name} needs the package {package} (pip install {package}), "
                "or choose another tracker (tensorboard | wandb | all | none)"
            )


def log_with(report_to: str) -> list[str] | None:
    """accelerate's ``Accelerator(log_with=...)``."""
    return tracker_names(report_to) or None


def init_trackers(accelerator: Any, report_to: str, config: dict[str, Any], output_dir: Path) -> None:
    """Start the trackers (main process; accelerate does nothing on the others) with the flat config."""
    names = tracker_names(report_to)
    if not names:
        return
    init_kwargs: dict[str, dict[str, Any]] = {}
    if "wandb" in names:
        wandb_dir = Path(os.environ.get("WANDB_DIR") or Path(output_dir) / "logs")
        if accelerator.is_main_process:
            wandb_dir.mkdir(parents=True, exist_ok=True)
        init_kwargs["wandb"] = {"dir": str(wandb_dir), "name": Path(output_dir).name}
    accelerator.init_trackers("soarflow", config=config, init_kwargs=init_kwargs)


def log_validation_images(accelerator: Any, images: torch.Tensor, captions: list[str], step: int) -> None:
    """The validation images (B, 3, H, W) in [-1, 1] to every tracker that takes images."""
    from ..utils.images import to_uint8

    names = {t.name for t in accelerator.trackers}
    if not names:
        return
    pixels = to_uint8(images)  # (B, H, W, 3) uint8
    if "tensorboard" in names:
        accelerator.get_tracker("tensorboard").log_images({"validation": pixels}, step=step, dataformats="NHWC")
    if "wandb" in names:
        import wandb

        run = accelerator.get_tracker("wandb", unwrap=True)
        run.log({"validation": [wandb.Image(img, caption=cap) for img, cap in zip(pixels, captions)]}, step=step)


__all__ = ["REPORT_TO", "check_installed", "init_trackers", "log_validation_images", "log_with", "tracker_names"]
