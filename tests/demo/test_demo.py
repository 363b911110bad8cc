"""`soarflow demo` end to end on a tiny stand-in base model: report contents, files, and output-dir safety."""

import json

import pytest
import torch

from soarflow.commands.demo import main

METHODS = ("base", "sft", "soar")  # the default --methods, plus the base
from soarflow.models.embedded import save_checkpoint
from soarflow.tasks.shapes import ShapesModelSection, ShapesTask, ShapesDataSection


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    task = ShapesTask(
        ShapesModelSection(pretrained=None, architecture="mmdit", hidden_size=32, depth=1, num_heads=2),
        ShapesDataSection(),
    )
    torch.manual_seed(0)
    model = task.build_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return save_checkpoint(model, tmp_path_factory.mktemp("base") / "tiny.safetensors")


def demo_args(base, out, **extra):
    args = {
        "base": base,
        "output_dir": out,
        "max_train_steps": 2,
        "train_batch_size": 4,
        "num_aux": 2,
        "rollout_steps": 5,
        "prompts_per_family": 1,
        "images_per_prompt": 2,
        "eval_num_steps": 4,
    }
    args.update(extra)
    return [f"--{k}={v}" for k, v in args.items()]


def test_demo_writes_a_complete_report_and_refuses_a_different_run(tiny_base, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(demo_args(tiny_base, out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["methods"]) == list(METHODS)
    for method in METHODS:
        m = report["methods"][method]["metrics"]["4"]
        assert 0 <= m["shapes_eval"]["overall"] <= 1
        assert set(m["shapes_eval"]["per_family"]) == {
            "single_object",
            "two_objects",
            "counting",
            "colors",
            "position",
            "color_attr",
        }
        assert m["frechet_distance"] >= 0 and m["diversity"] >= 0
        assert len(m["exposure_bias"]["bins"]) >= 1
        assert (out / f"samples_{method}.png").stat().st_size > 0
    assert report["methods"]["sft"]["train"]["steps"] == report["methods"]["soar"]["train"]["steps"] == 2
    assert report["settings"]["max_train_steps"] == 2
    assert (out / "comparison.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "overall" in table and "exposure gap" in table

    # Same settings again: prints the stored result, recomputes nothing.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(demo_args(tiny_base, out)) == 0
    assert "already computed" in capsys.readouterr().out
    # Different settings into the same folder: a clear error, and every file is untouched.
    assert main(demo_args(tiny_base, out, learning_rate=1e-3)) == 2
    assert "different settings" in capsys.readouterr().err
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after


def test_demo_methods_runs_any_subset_of_the_trainer_methods(tiny_base, tmp_path, capsys):
    out = tmp_path / "demo"
    methods = ["grpo", "scheduled_sampling", "input_perturbation"]
    assert main(demo_args(tiny_base, out, methods=",".join(methods))) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["methods"]) == ["base", *methods]
    fds = set()
    for m in methods:
        train = report["methods"][m]["train"]
        assert train["steps"] == 2 and train["wall_clock_s"] >= 0
        metrics = report["methods"][m]["metrics"]["4"]
        assert 0 <= metrics["shapes_eval"]["overall"] <= 1 and metrics["diversity"] >= 0
        fds.add(metrics["frechet_distance"])
    assert len(fds) == 3  # three trained models, three image sets
    assert "reward_mean" in report["methods"]["grpo"]["train"]["history"][-1]  # the GRPO recipe really ran
    table = capsys.readouterr().out
    assert all(m in table for m in methods) and "grpo 2 steps" in table


def test_demo_errors_name_the_bad_input(tmp_path, capsys):
    assert main(demo_args(tmp_path / "missing.safetensors", tmp_path / "o1")) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert main(demo_args("base", tmp_path / "o2", max_train_steps=0)) == 2
    assert "--max_train_steps" in capsys.readouterr().err
    assert main(demo_args("base", tmp_path / "o2", methods="sft,dpo")) == 2
    err = capsys.readouterr().err
    assert "--methods" in err and "dpo" in err and "grpo" in err
    assert not (tmp_path / "o2").exists()
    (tmp_path / "o3").mkdir()
    (tmp_path / "o3" / "notes.txt").write_text("mine")
    assert main(demo_args("base", tmp_path / "o3")) == 2
    assert (tmp_path / "o3" / "notes.txt").read_text() == "mine"


def test_quick_demo_runs_the_readme_command_on_the_shipped_base(tmp_path):
    """`soarflow demo --quick` as a user runs it: the shipped base checkpoint, the real CLI, a finished report.
    Post-training must actually change the model (SFT and SOAR end at different weights, so different images)."""
    import subprocess
    import sys

    from soarflow.models.embedded import base_checkpoint_path

    assert base_checkpoint_path().is_file(), "the shipped base checkpoint is missing from the package"
    out = tmp_path / "quick"
    proc = subprocess.run(
        [sys.executable, "-m", "soarflow", "demo", "--quick", "--output_dir", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["max_train_steps"] == 20 and report["settings"]["base"] == "base"
    fds = {m: report["methods"][m]["metrics"]["10"]["frechet_distance"] for m in METHODS}
    assert len(set(fds.values())) == 3, fds  # three different models produced three different image sets
    assert "post-training: sft 20 steps" in proc.stdout


def test_former_guidance_flags_still_work():
    from soarflow.commands.demo import _new_spelling, build_parser, settings_from_args

    args = build_parser().parse_args([_new_spelling(a) for a in ["--cfg_scale=2", "--rollout_cfg", "3"]])
    s = settings_from_args(args)
    assert (s.guidance_scale, s.rollout_guidance_scale) == (2.0, 3.0)
    assert "--cfg_scale" not in build_parser().format_help()
