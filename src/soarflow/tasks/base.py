"""What the trainer needs from a model family: the `Task` base class.

The trainer owns the loop (optimizer, accelerate, EMA, checkpoints, logging); the objective
(`soarflow.objective`) owns the math; a `Task` owns everything model- and data-specific: building the
trainable velocity model, the dataset, turning a raw batch into `(x0, cond)` with any frozen encoders
(VAE, text encoders), the null condition used for guidance and condition dropout, validation images and
saving/loading weights in the family's native format. The embedded ShapesEval model and the diffusers
SD3/FLUX adapters each implement it.

A family subclasses `Task` and implements the methods that raise NotImplementedError; the hooks below them
have defaults that fit a pixel-space model with no frozen parts, so the trainer calls every method without
asking whether the task has it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..conditioning import cond_index


class Task:
    @classmethod
    def from_config(cls, model: dict, data: dict, train_config: Any = None) -> "Task":
        """The task for a config's free-form ``model:`` and ``data:`` sections (validated by the task) and the
        whole `TrainConfig` (None outside training)."""
        raise NotImplementedError(f"{cls.__name__}.from_config")

    def build_model(self) -> nn.Module:
        """The trainable module. Calling it as `model(x, sigma, cond)` returns the velocity."""
        raise NotImplementedError(f"{type(self).__name__}.build_model")

    def train_dataset(self) -> torch.utils.data.Dataset:
        """Training samples; `collate` turns a list of them into one batch."""
        raise NotImplementedError(f"{type(self).__name__}.train_dataset")

    def collate(self, samples: Sequence[Any]) -> Any:
        """Batch raw samples (called in the DataLoader)."""
        raise NotImplementedError(f"{type(self).__name__}.collate")

    def encode_batch(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, Any]:
        """Return `(x0, cond)` on `device`: clean latents/pixels and the model's condition."""
        raise NotImplementedError(f"{type(self).__name__}.encode_batch")

    def encode_prompts(self, batch: Any, n: int, device: torch.device) -> tuple[tuple[int, ...], Any]:
        """``(sample_shape, cond)``: the shape of one sample and the condition of the batch's first ``n`` rows, for
        methods that generate their own samples (GRPO). Default: through `encode_batch`; latent tasks override it
        to encode the text alone (and to accept prompt-only batches)."""
        x0, cond = self.encode_batch(batch, device)
        return tuple(x0.shape[1:]), cond_index(cond, torch.arange(n, device=x0.device))

    def null_cond(self, batch_size: int, device: torch.device) -> Any:
        """The unconditional condition (same structure as `cond`) for guidance and condition dropout."""
        raise NotImplementedError(f"{type(self).__name__}.null_cond")

    def validation_images(self, model: nn.Module, device: torch.device) -> tuple[torch.Tensor, list[str]]:
        """Images in [-1, 1], shape (B, 3, H, W), and their captions, for the periodic sample grid."""
        raise NotImplementedError(f"{type(self).__name__}.validation_images")

    def save_model(self, model: nn.Module, path: Path) -> Path | None:
        """Write the weights in the family's native format (safetensors / diffusers folder / LoRA); return the
        path written when it differs from `path` (e.g. ``model.safetensors``)."""
        raise NotImplementedError(f"{type(self).__name__}.save_model")

    def load_model_weights(self, model: nn.Module, path: Path) -> None:
        """Inverse of `save_model`, into an already built model."""
        raise NotImplementedError(f"{type(self).__name__}.load_model_weights")

    # -- hooks with defaults -----------------------------------------------------------------------------
    def batch_indices(self, dataset: Any, global_batch: int, seed: int, epoch: int) -> list[list[int]] | None:
        """The epoch's global batches as dataset indices (e.g. one aspect-ratio bucket per batch), or None for
        the trainer's seeded random batches."""
        return None

    def enable_gradient_checkpointing(self, model: nn.Module) -> None:
        """Recompute activations in the backward pass (config ``gradient_checkpointing``)."""
        if not hasattr(model, "enable_gradient_checkpointing"):
            raise ValueError(
                f"gradient_checkpointing: {type(model).__name__} has no enable_gradient_checkpointing(); "
                "set gradient_checkpointing: false"
            )
        model.enable_gradient_checkpointing()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from the model's space (a VAE decoder for latent models); pixels by default."""
        return x.float().clamp(-1, 1)

    @contextlib.contextmanager
    def frozen_on(self, device: torch.device) -> Iterator[Any]:
        """The frozen parts (VAE, text encoders) on `device` for the duration; nothing by default."""
        yield None

    def data_summary(self) -> str | None:
        """One line about the data for the run summary (e.g. bad samples skipped), or None."""
        return None

    def manifest_evaluation(self, model: nn.Module) -> dict:
        """Quality figures of a finished model for the run's manifest.json (``write_manifest``); none by default."""
        return {}
