"""eval-shapes on bad inputs: every error is one line naming the file; run and checkpoint folders resolve to their
model; fidelity (FD, diversity) is reported with alignment."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from soarflow.commands.eval_shapes import main

SMALL = ["--prompts_per_family", "2", "--images_per_prompt", "2"]


@pytest.fixture()
def real_dir(tmp_path):
    folder = tmp_path / "real"
    assert main(["--write_real", str(folder), *SMALL]) == 0
    return folder


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert str(n) in err, err
    return err


def test_corrupt_truncated_and_wrong_size_pngs_are_named(real_dir, capsys):
    bad = real_dir / "0003_1.png"
    good = bad.read_bytes()
    bad.write_bytes(b"this is not a png")
    assert main(["--images", str(real_dir), *SMALL]) == 2
    one_line_error(capsys, bad, "corrupt")
    bad.write_bytes(good[: len(good) // 2])
    assert main(["--images", str(real_dir), *SMALL]) == 2
    one_line_error(capsys, bad, "truncated")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(bad)
    assert main(["--images", str(real_dir), *SMALL]) == 2
    one_line_error(capsys, bad, "40x40")


def test_grayscale_is_converted_and_counted(real_dir, tmp_path, capsys):
    for name in ("0000_0.png", "0001_1.png"):
        Image.open(real_dir / name).convert("L").save(real_dir / name)
    assert main(["--images", str(real_dir), *SMALL, "--json", str(tmp_path / "s.json")]) == 0
    assert "converted 2 non-RGB image(s) to RGB" in capsys.readouterr().err


def test_fidelity_is_reported_with_alignment(real_dir, tmp_path, capsys):
    assert main(["--images", str(real_dir), *SMALL, "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "Frechet dist." in out and "diversity" in out
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["fd"] >= 0 and summary["diversity"] > 0
    # noise images are far from the real renders
    rng = np.random.default_rng(0)
    for path in real_dir.iterdir():
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    assert main(["--images", str(real_dir), *SMALL, "--json", str(tmp_path / "noise.json")]) == 0
    assert json.loads((tmp_path / "noise.json").read_text())["fd"] > 3 * summary["fd"]


def test_unwritable_outputs_fail_before_any_work(real_dir, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    import soarflow.commands.eval_shapes as cli

    monkeypatch.setattr(cli, "load_image_folder", lambda *a, **k: pytest.fail("work started"))
    assert main(["--images", str(real_dir), *SMALL, "--json", str(blocker / "s.json")]) == 2
    one_line_error(capsys, blocker / "s.json", "cannot write")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(ro))  # root ignores permissions
    assert main(["--images", str(real_dir), *SMALL, "--json", str(ro / "s.json")]) == 2
    one_line_error(capsys, ro / "s.json", "cannot write")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from soarflow.train import load_config, train

    out = tmp_path_factory.mktemp("run") / "run"
    train(
        load_config(
            None,
            [
                "--task",
                "shapes",
                "--output_dir",
                str(out),
                "--max_train_steps",
                "2",
                "--checkpointing_steps",
                "1",
                "--train_batch_size",
                "4",
                "--report_to",
                "none",
                "--show_progress",
                "false",
                "--method",
                "sft",
                "--model.pretrained",
                "null",
                "--model.architecture",
                "mmdit",
                "--model.hidden_size",
                "32",
                "--model.depth",
                "1",
                "--model.num_heads",
                "2",
                "--data.num_samples",
                "8",
                "--learning_rate",
                "1e-3",
            ],
        )
    )
    return out


@pytest.mark.parametrize("which", ["run", "checkpoint-1", "file"])
def test_run_and_checkpoint_folders_resolve_to_their_model(tiny_run, tmp_path, capsys, which):
    target = {"run": tiny_run, "checkpoint-1": tiny_run / "checkpoint-1", "file": tiny_run / "model.safetensors"}[which]
    args = [
        "--checkpoint",
        str(target),
        "--prompts_per_family",
        "1",
        "--images_per_prompt",
        "2",
        "--num_steps",
        "2",
        "--json",
        str(tmp_path / "s.json"),
    ]
    assert main(args) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "2 Euler steps, guidance 4.0" in err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["num_images"] == 12 and "fd" in summary and "diversity" in summary


def test_checkpoint_folder_errors_are_one_line(tiny_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--checkpoint", str(empty), *SMALL]) == 2
    one_line_error(capsys, empty)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    assert main(["--checkpoint", str(broken), *SMALL]) == 2
    one_line_error(capsys, broken)


def test_checkpoint_resolution_matches_the_saved_weights(tiny_run):
    import torch
    from safetensors.torch import load_file

    from soarflow.train.shapes_checkpoint import describe, load_shapes_checkpoint

    assert describe(tiny_run) == ("file", tiny_run / "model.safetensors")
    model = load_shapes_checkpoint(tiny_run / "checkpoint-1")
    saved = load_file(str(tiny_run / "checkpoint-1" / "trainable_params.safetensors"))
    params = dict(model.named_parameters())
    assert saved and all(torch.equal(params[k], v) for k, v in saved.items())
    final = dict(load_shapes_checkpoint(tiny_run).named_parameters())
    assert any(not torch.equal(final[k], v) for k, v in saved.items())  # step 2 differs from step 1
