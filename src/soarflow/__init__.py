"""soarflow: post-train rectified-flow image generators with SOAR, SFT and RL baselines under one trainer.

The core is model-agnostic: a velocity model is any callable ``model(x, sigma, cond) -> v``.
"""

from .flow import interpolate, sample_t, shift_sigma, sigma_schedule, velocity_target, x0_from_velocity
from .objective import ObjectiveOutput, SOARConfig, sft_loss, soar_loss
from .sampling import guided_velocity, integrate, sample_euler, sample_sde

__version__ = "0.1.0"

__all__ = [
    "SOARConfig",
    "ObjectiveOutput",
    "soar_loss",
    "sft_loss",
    "guided_velocity",
    "integrate",
    "sample_euler",
    "sample_sde",
    "interpolate",
    "sample_t",
    "shift_sigma",
    "sigma_schedule",
    "velocity_target",
    "x0_from_velocity",
]
