"""Training methods other than SOAR/SFT (:mod:`soarflow.objective`), as pure math on a velocity model.

* :mod:`.grpo`: Flow-GRPO (reward RL with per-step Gaussian log-probabilities of an SDE sampler);
* :mod:`.scheduled_sampling`: train on the model's own k-step rollout states with the flow target;
* :mod:`.input_perturbation`: DDPM-IP, a perturbed noise in the input and the clean noise in the target.

These modules know nothing about the trainer; :mod:`soarflow.train.methods` adapts them to it.
"""

from .grpo import GRPOConfig
from .input_perturbation import InputPerturbationConfig, input_perturbation_loss
from .scheduled_sampling import ScheduledSamplingConfig, scheduled_sampling_loss

__all__ = [
    "GRPOConfig",
    "InputPerturbationConfig",
    "ScheduledSamplingConfig",
    "input_perturbation_loss",
    "scheduled_sampling_loss",
]
