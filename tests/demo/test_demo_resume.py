"""`soarflow demo` survives: an interrupted demo continues, --overwrite starts over, a diverged method is reported
and does not abort the others, a bad --output_dir is a one-line error before any work; grids mark pass/fail."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import soarflow.commands.demo as demo
from soarflow.commands.demo import main

from test_demo import demo_args, tiny_base  # noqa: F401  (fixture)


def test_an_interrupted_demo_continues_where_it_stopped(tiny_base, tmp_path, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "demo"
    real_evaluate = demo.evaluate
    calls = []

    def evaluate_then_interrupt(model, *a, **k):
        calls.append(1)
        if len(calls) == 3:  # the third evaluation (soar): Ctrl-C
            raise KeyboardInterrupt
        return real_evaluate(model, *a, **k)

    monkeypatch.setattr(demo, "evaluate", evaluate_then_interrupt)
    assert main(demo_args(tiny_base, out)) == 130
    assert "run the same command again" in capsys.readouterr().err
    assert not (out / "report.json").exists()

    trained = []
    real_post_train = demo.post_train
    monkeypatch.setattr(demo, "post_train", lambda *a: trained.append(a) or real_post_train(*a))
    assert main(demo_args(tiny_base, out)) == 0
    log = capsys.readouterr().out
    assert trained == [] and len(calls) == 4  # nothing retrained, only the missing evaluation ran
    assert "post-training SFT: already done" in log and "evaluating soar: already done" not in log
    report = json.loads((out / "report.json").read_text())
    assert all(report["methods"][m]["metrics"] for m in ("base", "sft", "soar"))

    # --overwrite starts over (and only ever deletes a demo folder)
    assert main(demo_args(tiny_base, out, learning_rate=1e-3, overwrite="")[:-1] + ["--overwrite"]) == 0
    assert len(trained) == 2
    assert json.loads((out / "report.json").read_text())["settings"]["learning_rate"] == 1e-3


def test_a_diverged_method_is_reported_and_the_others_finish(tiny_base, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "demo"
    assert main(demo_args(tiny_base, out, learning_rate=1e6, max_train_steps=12)) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["methods"]["base"]["metrics"] is not None
    diverged = [m for m in ("sft", "soar") if report["methods"][m]["metrics"] is None]
    assert diverged, "lr 1e6 should diverge"
    for m in diverged:
        step = report["methods"][m]["train"]["diverged_at_step"]
        assert f"{m} diverged at step {step}" in printed


def test_bad_output_dir_is_one_line_before_any_work(tiny_base, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(demo, "post_train", lambda *a: pytest.fail("work started"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(demo_args(tiny_base, a_file)) == 2
    err = capsys.readouterr().err.strip()
    assert "is a file" in err and str(a_file) in err and len(err.splitlines()) == 1
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(ro))  # root ignores chmod
    assert main(demo_args(tiny_base, ro / "demo")) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write" in err and len(err.splitlines()) == 1


def test_grid_marks_pass_and_fail_with_a_border_and_legend():
    from soarflow.utils.images import MARK_FAIL, MARK_PASS, make_grid

    images = torch.zeros(2, 3, 8, 8)
    plain = make_grid(images, ["a", "b"])
    marked = np.asarray(make_grid(images, ["a", "b"], marks=[True, False]))
    assert marked.shape[0] > np.asarray(plain).shape[0]  # the legend line
    colors = {tuple(c) for c in marked.reshape(-1, 3)}
    assert MARK_PASS in colors and MARK_FAIL in colors
    assert MARK_PASS not in {tuple(c) for c in np.asarray(plain).reshape(-1, 3)}


@pytest.mark.parametrize("method", ["sft", "soar"])
def test_the_shipped_yaml_is_the_demo_recipe(tmp_path, monkeypatch, method):
    import soarflow.train as train_module
    from soarflow.train import load_config
    from soarflow.train.config import LOCATION_KEYS, NON_DEFINING_KEYS, config_differences

    seen = []
    monkeypatch.setattr(train_module, "train", lambda cfg: seen.append(cfg))
    demo.post_train(method, demo.DemoSettings(), tmp_path / "run")
    yaml_cfg = load_config(f"configs/shapes_{method}.yaml")
    diffs = [
        d
        for d in config_differences(yaml_cfg.to_dict(), seen[0].to_dict())
        if d.split(":")[0] not in NON_DEFINING_KEYS | LOCATION_KEYS
    ]
    assert diffs == []
