"""Pretraining is a config of the trainer: the t-density mixture, the time budget, the manifest, and
`soarflow pretrain` as flags mapped onto configs/shapes_pretrain.yaml."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from soarflow.flow import sample_t
from soarflow.train import load_config, train

from .test_trainer import config
from .toy_task import ToyTask


def test_uniform_fraction_replaces_that_share_of_t_by_uniform_draws():
    plain = sample_t(1000, logit_mean=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        plain, sample_t(1000, logit_mean=0.3, uniform_fraction=0.0, generator=torch.Generator().manual_seed(0))
    )  # f = 0 draws nothing extra
    gen = torch.Generator().manual_seed(0)
    mixed = sample_t(1000, logit_mean=0.3, uniform_fraction=0.25, generator=gen)
    gen = torch.Generator().manual_seed(0)
    t = sample_t(1000, logit_mean=0.3, generator=gen)
    u, pick = torch.rand(1000, generator=gen), torch.rand(1000, generator=gen) < 0.25
    assert torch.equal(mixed, torch.where(pick, u, t))
    assert 200 < int(pick.sum()) < 300


def test_uniform_fraction_reaches_the_objective_and_is_checked():
    assert config_of("--uniform_fraction", "0.25").soar.uniform_fraction == 0.25
    with pytest.raises(ValueError, match="config key 'uniform_fraction'"):
        config_of("--uniform_fraction", "1.5")
    with pytest.raises(ValueError, match="config key 'uniform_fraction'.*t_density"):
        config_of("--uniform_fraction", "0.25", "--soar.aux_sigma_density", "t_density")


def config_of(*overrides):
    return load_config(None, list(overrides))


def test_max_train_seconds_stops_training_after_the_step_that_reaches_it(tmp_path):
    result = train(config(tmp_path, "budget", "--max_train_steps", "50", "--max_train_seconds", "1e-6"), task=ToyTask())
    assert result.global_step == 1 and result.model_path.exists()


# ---------------------------------------------------------------------------------------------- soarflow pretrain


def test_the_shipped_base_command_is_configs_shapes_pretrain_yaml():
    """`soarflow pretrain --output_dir /tmp/base --dataloader_num_workers 6` (the shipped base's manifest) is the
    trainer config in configs/shapes_pretrain.yaml with those two keys overridden."""
    from soarflow.commands.pretrain import build_parser, pretrain_config
    from soarflow.models.embedded import base_checkpoint_path

    command = json.loads(base_checkpoint_path().with_suffix(".json").read_text())["command"]
    argv = shlex.split(command)[2:]
    assert argv == ["--output_dir", "/tmp/base", "--dataloader_num_workers", "6"]
    expected = load_config("configs/shapes_pretrain.yaml", [f"--{argv[0][2:]}={argv[1]}", f"--{argv[2][2:]}={argv[3]}"])
    assert pretrain_config(build_parser().parse_args(argv)) == expected
    assert pretrain_config(build_parser().parse_args([])) == load_config("configs/shapes_pretrain.yaml")


def test_pretrain_flags_map_onto_config_keys():
    from soarflow.commands.pretrain import build_parser, pretrain_config

    cfg = pretrain_config(
        build_parser().parse_args(
            [
                "--architecture",
                "mmdit",
                "--hidden_size",
                "32",
                "--depth",
                "2",
                "--lr_scheduler",
                "constant",
                "--max_train_seconds",
                "60",
                "--uniform_fraction",
                "0",
                "--seed",
                "3",
                "--num_samples",
                "100",
                "--eval_prompts_per_family",
                "2",
                "--mixed_precision",
                "bf16",
                "--ema_decay",
                "0.99",
            ]
        )
    )
    assert cfg.model["architecture"] == "mmdit" and cfg.model["hidden_size"] == 32 and cfg.model["depth"] == 2
    assert cfg.model["pretrained"] is None and cfg.method == "sft" and cfg.use_ema and cfg.write_manifest
    assert cfg.lr_scheduler == "constant_with_warmup"  # pretrain's "constant" keeps its warm-up
    assert cfg.max_train_seconds == 60 and cfg.uniform_fraction == 0 and cfg.seed == 3
    assert cfg.data == {"split": "pretrain", "num_samples": 100, "seed": 3, "eval_prompts_per_family": 2}
    assert cfg.mixed_precision == "bf16" and cfg.ema_decay == 0.99


TINY = [
    "--max_train_steps",
    "3",
    "--train_batch_size",
    "4",
    "--lr_warmup_steps",
    "1",
    "--num_samples",
    "16",
    "--architecture",
    "mmdit",
    "--hidden_size",
    "32",
    "--depth",
    "1",
    "--num_heads",
    "2",
    "--eval_prompts_per_family",
    "1",
    "--checkpointing_steps",
    "2",
]


def test_pretrain_end_to_end_writes_the_model_and_its_manifest(tmp_path, capsys):
    from soarflow.cli import main
    from soarflow.commands.pretrain import build_parser
    from soarflow.models.embedded import load_shapes_model

    out = tmp_path / "base"
    argv = ["--output_dir", str(out), *TINY]
    assert main(["pretrain", *argv]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "soarflow pretrain " + shlex.join(argv)
    assert manifest["args"] == vars(build_parser().parse_args(argv))
    assert manifest["steps"] == 3 and manifest["config"]["uniform_fraction"] == 0.25
    assert manifest["config"]["soar"]["reuse_main_output"] is True  # `auto`, as resolved on this device (a CPU)
    model = load_shapes_model(out / "model.safetensors")
    assert manifest["parameters"] == sum(p.numel() for p in model.parameters())
    assert 0 <= manifest["shapes_eval"]["overall"] <= 1 and manifest["shapes_eval"]["fd"] >= 0
    assert set(manifest["shapes_eval"]["per_family"]) == {
        "single_object",
        "two_objects",
        "counting",
        "colors",
        "position",
        "color_attr",
    }
    assert manifest["final_loss_ema"] > 0 and "diversity" in manifest["shapes_eval"]

    # an existing model is kept unless --overwrite is given
    before = (out / "model.safetensors").read_bytes()
    assert main(["pretrain", *argv]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert main(["pretrain", *argv, "--max_train_steps", "2", "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["steps"] == 2
