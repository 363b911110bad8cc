"""TrainConfig: YAML + dotted overrides, typed parsing, errors naming the key, the objective mapping, CLI."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from soarflow.train import TrainConfig, from_dict, get_task_class, load_config
from soarflow.train.config import NON_DEFINING_KEYS, config_differences, parse_overrides
from soarflow.commands.train import main_train

from .toy_task import ToyTask


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(
        tmp_path,
        """
method: sft
learning_rate: 1e-4          # PyYAML reads this as a string; the float field converts it
train_batch_size: 4
soar: {num_aux: 3, guidance_scale: 2}
model: {rank: 8}
""",
    )
    cfg = load_config(
        path,
        [
            "--soar.num_aux",
            "4",
            "--learning_rate=2e-5",
            "--use_ema",
            "--max_grad_norm",
            "null",
            "--model.alpha",
            "16",
            "--data.prompts",
            "[a, b]",
            "--method",
            "soar",
        ],
    )
    assert cfg.method == "soar" and cfg.learning_rate == 2e-5 and cfg.train_batch_size == 4
    assert cfg.soar.num_aux == 4 and cfg.soar.guidance_scale == 2.0 and isinstance(cfg.soar.guidance_scale, float)
    assert cfg.use_ema is True and cfg.max_grad_norm is None
    assert cfg.model == {"rank": 8, "alpha": 16} and cfg.data == {"prompts": ["a", "b"]}
    # the defaults without a file
    assert load_config().to_dict() == TrainConfig().to_dict()


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["--soar.aux_chunk_size", "64", "--weighting_scheme", "cosmap"])
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["--soar.num_auxx", "4"], "unknown config key 'soar.num_auxx' (did you mean 'soar.num_aux'?)"),
        (["--learning_rat", "1"], "unknown config key 'learning_rat'"),
        (["--train_batch_size", "four"], "config key 'train_batch_size': expected int"),
        (["--use_ema", "maybe"], "config key 'use_ema': expected bool"),
        (["--mixed_precision", "fp8"], "config key 'mixed_precision': must be one of no, fp16, bf16"),
        (["--learning_rate", "-1"], "config key 'learning_rate': must be > 0"),
        (["--soar.num_aux", "-1"], "config key 'soar.num_aux': must be an integer >= 0"),
        (["--soar.sigma_floor", "2"], "config key 'soar.sigma_floor'"),
        (["--cond_dropout", "1.5"], "config key 'cond_dropout'"),
        (["--checkpoints_total_limit", "0"], "config key 'checkpoints_total_limit'"),
        (["--task", "sdxl"], "config key 'task'"),
        (["--soar", "3"], "config key 'soar': expected a section"),
        (["--soar.cond_dropout", "0.1"], "config key 'soar.cond_dropout' is set by the top-level key 'cond_dropout'"),
        (["--soar.t_density", "uniform"], "config key 'soar.t_density' is set by the top-level key 'weighting_scheme'"),
        (["--max_train_steps"], "needs a value"),
        (["oops"], "expected a --key"),
    ],
)
def test_errors_name_the_key(overrides, key):
    with pytest.raises(ValueError) as err:
        load_config(None, overrides)
    assert key in str(err.value)


def test_former_key_names_still_load_with_a_warning_naming_the_new_key(tmp_path):
    path = write(
        tmp_path,
        """
method: grpo
train_batch_size: 4
soar: {rollout_cfg: 2, rollout_kind: sde}
grpo: {cfg_scale: 3, noise_level: 0.5}
""",
    )
    with pytest.warns(FutureWarning) as caught:
        cfg = load_config(path)
    assert (cfg.soar.guidance_scale, cfg.soar.rollout_kind) == (2.0, "constant_sde")
    assert (cfg.grpo.guidance_scale, cfg.grpo.noise_scale) == (3.0, 0.5)
    said = " ".join(str(w.message) for w in caught)
    for new in ("'soar.guidance_scale'", "'constant_sde'", "'grpo.guidance_scale'", "'grpo.noise_scale'"):
        assert new in said
    # a command-line override with the former name overrides the file's current key
    with pytest.warns(FutureWarning, match="now .soar.guidance_scale."):
        assert (
            load_config(write(tmp_path, "soar: {guidance_scale: 2}\n"), ["--soar.rollout_cfg", "5"]).soar.guidance_scale
            == 5
        )
    with pytest.warns(FutureWarning, match="scheduled_sampling.guidance_scale"):
        assert (
            load_config(
                None, ["--method", "scheduled_sampling", "--scheduled_sampling.rollout_cfg", "3"]
            ).scheduled_sampling.guidance_scale
            == 3
        )
    # both names at once: an error naming the new key
    with pytest.raises(ValueError, match="former name of 'soar.guidance_scale'; set only 'soar.guidance_scale'"):
        load_config(write(tmp_path, "soar: {guidance_scale: 2, rollout_cfg: 3}\n"))
    # the Python API names the new step kind (and the official code's 'sde')
    from soarflow.objective import SOARConfig

    with pytest.raises(ValueError, match="'sde' is now 'constant_sde'.*'cps' with noise scale 1"):
        SOARConfig(rollout_kind="sde")


def test_a_run_folder_written_before_a_rename_compares_equal(tmp_path):
    from soarflow.train.checkpoint import check_output_dir

    old = TrainConfig().to_dict()
    old["soar"]["rollout_cfg"] = old["soar"].pop("guidance_scale")
    (tmp_path / "config.yaml").write_text(__import__("yaml").safe_dump(old))
    cfg = load_config(None, ["--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"])
    check_output_dir(cfg, None)  # the same run: no differences, nothing raised


def test_yaml_type_errors(tmp_path):
    with pytest.raises(ValueError, match="config key 'train_batch_size': expected int"):
        load_config(write(tmp_path, "train_batch_size: 2.5\n"))
    with pytest.raises(ValueError, match="config key 'use_ema': expected bool"):
        load_config(write(tmp_path, "use_ema: 1\n"))
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1\n"))
    with pytest.raises(ValueError, match="mapping at the top level"):
        load_config(write(tmp_path, "- 1\n"))
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


@dataclass
class _Section:
    size: int = 3
    prompts: list[str] = field(default_factory=lambda: ["x"])
    path: str | None = None


def test_from_dict_for_task_sections():
    s = from_dict(_Section, {"size": 5, "prompts": ["a", "b"]}, prefix="model")
    assert s == _Section(5, ["a", "b"], None)
    with pytest.raises(ValueError, match=r"unknown config key 'model.sise' \(did you mean 'model.size'\?\)"):
        from_dict(_Section, {"sise": 5}, prefix="model")
    with pytest.raises(ValueError, match=r"config key 'model.prompts\[1\]': expected str"):
        from_dict(_Section, {"prompts": ["a", 3]}, prefix="model")
    with pytest.raises(ValueError, match="section 'data': expected a mapping"):
        from_dict(_Section, [1], prefix="data")


@pytest.mark.parametrize(
    "scheme, density, weighting",
    [
        ("logit_normal", "logit_normal", "none"),
        ("mode", "mode", "none"),
        ("sigma_sqrt", "uniform", "sigma_sqrt"),
        ("cosmap", "uniform", "cosmap"),
        ("none", "uniform", "none"),
    ],
)
def test_soar_section_takes_weighting_scheme_and_shared_keys(scheme, density, weighting):
    cfg = load_config(
        None,
        [
            "--weighting_scheme",
            scheme,
            "--logit_std",
            "0.5",
            "--cond_dropout",
            "0.1",
            "--soar.num_aux",
            "2",
            "--soar.shift",
            "1",
        ],
    )
    obj = cfg.soar
    assert (obj.t_density, obj.weighting) == (density, weighting)
    assert obj.logit_std == 0.5 and obj.cond_dropout == 0.1 and obj.num_aux == 2 and obj.shift == 1.0


def test_parse_overrides_and_differences():
    assert parse_overrides(["--a", "1", "--b=x=y", "--flag", "--c", "-2"]) == [
        ("a", "1"),
        ("b", "x=y"),
        ("flag", None),
        ("c", "-2"),
    ]
    a, b = TrainConfig().to_dict(), TrainConfig(learning_rate=2e-4, max_train_steps=5).to_dict()
    diffs = config_differences(a, b)
    assert len(diffs) == 2 and diffs[0].startswith("learning_rate: 0.0001 -> 0.0002")
    assert "max_train_steps" in NON_DEFINING_KEYS and "learning_rate" not in NON_DEFINING_KEYS


def test_registry():
    with pytest.raises(ValueError, match="unknown task 'sdxl'"):
        get_task_class("sdxl")
    with pytest.raises(ValueError, match="could not import"):
        get_task_class("soarflow.nope:Task")
    with pytest.raises(ValueError, match="not a subclass of soarflow.tasks.Task"):
        get_task_class("soarflow.train.config:TrainConfig")
    assert get_task_class(f"{ToyTask.__module__}:ToyTask") is ToyTask


def test_cli_help_and_errors(capsys, tmp_path):
    assert main_train(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--soar.num_aux" in out and "--learning_rate" in out and "--config" in out
    assert main_train(["--soar.num_auxx", "4"]) == 2
    assert "unknown config key 'soar.num_auxx'" in capsys.readouterr().err
    assert main_train(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_cli_runs_a_task_from_a_module_path(capsys, tmp_path):
    path = write(
        tmp_path,
        f"""
task: "{ToyTask.__module__}:ToyTask"
method: sft
max_train_steps: 2
train_batch_size: 4
report_to: none
show_progress: false
data: {{n: 8}}
""",
    )
    assert main_train(["--config", str(path), "--output_dir", str(tmp_path / "run")]) == 0
    assert "2 steps" in capsys.readouterr().out
    assert (tmp_path / "run" / "model" / "toy.safetensors").is_file()
    # the same command again: the folder holds this run -> exit code 2 and a hint, nothing touched
    assert main_train(["--config", str(path), "--output_dir", str(tmp_path / "run")]) == 2
    assert "--resume_from_checkpoint latest" in capsys.readouterr().err


def test_shipped_shapes_recipes_load_and_differ_only_in_method():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    soar, sft = load_config(root / "shapes_soar.yaml"), load_config(root / "shapes_sft.yaml")
    assert (soar.task, soar.method, sft.method) == ("shapes", "soar", "sft")
    assert sorted(d.split(":")[0] for d in config_differences(soar.to_dict(), sft.to_dict())) == [
        "method",
        "output_dir",
    ]
    assert soar.soar.num_rollout_paths == 1 and soar.soar.num_aux > 0
