"""soarflow: post-train rectified-flow image generators with SOAR and its baselines (SFT, Flow-GRPO, scheduled
sampling, input perturbation) under one trainer.

The core is model-agnostic: a velocity model is any callable ``model(x, sigma, cond) -> v``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Imported on first use (PEP 562), so `soarflow --help` and `import soarflow` do not load torch.
_LAZY = {
    "interpolate": "flow",
    "sample_t": "flow",
    "shift_sigma": "flow",
    "sigma_schedule": "flow",
    "velocity_target": "flow",
    "x0_from_velocity": "flow",
    "ObjectiveOutput": "objective",
    "SOARConfig": "objective",
    "sft_loss": "objective",
    "soar_loss": "objective",
    "guided_velocity": "sampling",
    "integrate": "sampling",
    "sample_euler": "sampling",
    "sample_sde": "sampling",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'soarflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
