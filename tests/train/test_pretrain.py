"""Pretraining is a config of the trainer: the t-density mixture, the time budget, the manifest, and
`soarflow pretrain` as flags mapped onto configs/shapes_pretrain.yaml."""

from __future__ import annotations

import pytest
import torch

from soarflow.flow import sample_t
from soarflow.train import load_config, train

from .test_trainer import config
from .toy_task import ToyTask


def test_uniform_fraction_replaces_that_share_of_t_by_uniform_draws():
    plain = sample_t(1000, logit_mean=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain, sample_t(1000, logit_mean=0.3, uniform_fraction=0.0,
                                       generator=torch.Generator().manual_seed(0)))  # f = 0 draws nothing extra
    gen = torch.Generator().manual_seed(0)
    mixed = sample_t(1000, logit_mean=0.3, uniform_fraction=0.25, generator=gen)
    gen = torch.Generator().manual_seed(0)
    t = sample_t(1000, logit_mean=0.3, generator=gen)
    u, pick = torch.rand(1000, generator=gen), torch.rand(1000, generator=gen) < 0.25
    assert torch.equal(mixed, torch.where(pick, u, t))
    assert 200 < int(pick.sum()) < 300


def test_uniform_fraction_reaches_the_objective_and_is_checked():
    assert config_of("--uniform_fraction", "0.25").objective_config().uniform_fraction == 0.25
    with pytest.raises(ValueError, match="config key 'uniform_fraction'"):
        config_of("--uniform_fraction", "1.5")
    with pytest.raises(ValueError, match="config key 'uniform_fraction'.*t_density"):
        config_of("--uniform_fraction", "0.25", "--soar.aux_sigma_density", "t_density")


def config_of(*overrides):
    return load_config(None, list(overrides))


def test_max_train_seconds_stops_training_after_the_step_that_reaches_it(tmp_path):
    result = train(config(tmp_path, "budget", "--max_train_steps", "50", "--max_train_seconds", "1e-6"), task=ToyTask())
    assert result.global_step == 1 and result.model_path.exists()

