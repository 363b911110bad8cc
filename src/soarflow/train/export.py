"""Every checkpoint as a model other tools load: ``checkpoint-N/model`` written by the task's ``save_model``.

A checkpoint holds what resuming needs (``trainable_params.safetensors``, optimizer, RNG states: train/checkpoint.py);
with ``checkpoint_model: true`` (the default) it also holds the model as the final save would write it at that step —
for the diffusers tasks a folder that ``Pipeline.from_pretrained(base, transformer=...)`` or
``pipe.load_lora_weights(checkpoint-N/model)`` reads, in the run's ``model.save_dtype`` and with its single-file /
ComfyUI extras. With ``use_ema`` the EMA weights are written (what the final model would hold had training stopped
there); the training weights are restored afterwards. It costs one more copy of the trainable weights per checkpoint
(all weights for a full fine-tune: use ``model.save_dtype: bf16`` to halve it, or ``checkpoint_model: false``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import MODEL_DIR
from .ema import ema_weights


def export_checkpoint_model(accelerator: Any, task: Any, model: nn.Module, ema: Any, checkpoint: Path) -> Path | None:
    """Write ``checkpoint/model`` with the task's ``save_model`` (main process); returns the path written there."""
    written = None
    if accelerator.is_main_process:
        with torch.no_grad(), ema_weights(ema, model):
            target = Path(checkpoint) / MODEL_DIR
            written = task.save_model(model, target)
            written = Path(written) if written is not None else target
    accelerator.wait_for_everyone()
    return written


__all__ = ["export_checkpoint_model"]
