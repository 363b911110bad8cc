"""What the trainer needs from a model family: the `Task` protocol.

The trainer owns the loop (optimizer, accelerate, EMA, checkpoints, logging); the objective
(`soarflow.objective`) owns the math; a `Task` owns everything model- and data-specific: building the
trainable velocity model, the dataset, turning a raw batch into `(x0, cond)` with any frozen encoders
(VAE, text encoders), the null condition used for guidance and condition dropout, validation images and
saving/loading weights in the family's native format. The embedded ShapesEval model and the diffusers
SD3/FLUX adapters each implement it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Task(Protocol):
    def build_model(self) -> nn.Module:
        """The trainable module. Calling it as `model(x, sigma, cond)` returns the velocity."""

    def train_dataset(self) -> torch.utils.data.Dataset:
        """Training samples; `collate` turns a list of them into one batch."""

    def collate(self, samples: Sequence[Any]) -> Any:
        """Batch raw samples (called in the DataLoader)."""

    def encode_batch(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, Any]:
        """Return `(x0, cond)` on `device`: clean latents/pixels and the model's condition."""

    def null_cond(self, batch_size: int, device: torch.device) -> Any:
        """The unconditional condition (same structure as `cond`) for guidance and condition dropout."""

    def validation_images(self, model: nn.Module, device: torch.device) -> tuple[torch.Tensor, list[str]]:
        """Images in [-1, 1], shape (B, 3, H, W), and their captions, for the periodic sample grid."""

    def save_model(self, model: nn.Module, path: Path) -> None:
        """Write the weights in the family's native format (safetensors / diffusers folder / LoRA)."""

    def load_model_weights(self, model: nn.Module, path: Path) -> None:
        """Inverse of `save_model`, into an already built model."""
