"""Model-side input errors: architecture keys with a pretrained checkpoint, `soarflow sample` without diffusers or
on a shapes run."""

from __future__ import annotations

import sys

import pytest

from soarflow.train import load_config, train


def test_architecture_key_with_a_pretrained_checkpoint_is_refused(tmp_path):
    cfg = load_config("configs/shapes_soar.yaml", ["--output_dir", str(tmp_path / "r"), "--model.hidden_size", "64"])
    with pytest.raises(ValueError, match=r"model.hidden_size.*model.pretrained: null.*'base'"):
        train(cfg)
    assert not (tmp_path / "r").exists()


def test_sample_without_diffusers_names_the_install_command(tmp_path, monkeypatch, capsys):
    from soarflow.commands.sample import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "soarflow_model.json").write_text('{"family": "sd3"}')
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    assert main(["--model", str(model), "--prompt", "x", "--output_dir", str(tmp_path / "out")]) == 2
    assert "pip install 'soarflow[diffusers]'" in capsys.readouterr().err


def test_sample_on_a_shapes_run_points_to_eval_shapes(tmp_path, capsys):
    from soarflow.commands.sample import main

    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "config.yaml").write_text("task: shapes\n")
    assert main(["--model", str(run / "checkpoint-2"), "--prompt", "x", "--output_dir", str(tmp_path / "o")]) == 2
    assert "soarflow eval-shapes --checkpoint" in capsys.readouterr().err
