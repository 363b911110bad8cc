"""Runs that survive: divergence never leaves only NaN checkpoints, SIGTERM/SIGINT save and resume bit-exactly,
resume accepts any spelling of the output folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from soarflow.train import load_config, train
from soarflow.train.checkpoint import STATE_FILE, TRAINABLE_FILE, list_checkpoints, prune_checkpoints
from soarflow.train.safety import EXIT_INTERRUPTED, Diverged

from .test_trainer import assert_same, config, weights
from .toy_task import ToyTask

REPO = Path(__file__).resolve().parents[2]
SHAPES_CONFIG = REPO / "configs" / "shapes_soar.yaml"


def tiny_shapes(out: Path, *extra: str):
    """The issue's reproduction (`--learning_rate 1e6 --checkpointing_steps 2` on configs/shapes_soar.yaml) on a
    tiny from-scratch model so it runs in about a second."""
    return load_config(
        SHAPES_CONFIG,
        [
            "--output_dir",
            str(out),
            "--learning_rate",
            "1e6",
            "--checkpointing_steps",
            "2",
            "--max_train_steps",
            "12",
            "--train_batch_size",
            "4",
            "--report_to",
            "none",
            "--show_progress",
            "false",
            "--validation_steps",
            "0",
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
            "16",
            "--soar.rollout_steps",
            "4",
            "--soar.num_aux",
            "1",
            "--adam_weight_decay",
            "0",
            *extra,
        ],
    )  # decay 1e-4 x lr 1e6 would flip the weights in step 1


def all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(path / TRAINABLE_FILE)).values())


def test_divergence_keeps_a_finite_checkpoint_and_latest_resumes_from_it(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Diverged) as info:
        train(tiny_shapes(out))
    err = info.value
    kept = list_checkpoints(out)
    assert kept and all(all_finite(p) for p in kept)
    assert err.checkpoint == kept[-1] and err.step > int(kept[-1].name.split("-")[1])
    assert f"diverged at step {err.step}" in str(err) and str(kept[-1]) in str(err)
    assert not (out / "model.safetensors").exists()  # no final model from diverged weights

    step = int(kept[-1].name.split("-")[1])
    resumed = train(tiny_shapes(out, "--resume_from_checkpoint", "latest", "--max_train_steps", str(step)))
    assert resumed.resumed_from == kept[-1] and resumed.global_step == step
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())


def test_skip_nonfinite_steps_budget(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Diverged):
        train(tiny_shapes(out))
    step = int(list_checkpoints(out)[-1].name.split("-")[1])
    before = load_file(str(list_checkpoints(out)[-1] / TRAINABLE_FILE))
    # within the budget: bad updates are skipped, the weights stay those of the good checkpoint
    result = train(
        tiny_shapes(
            out,
            "--resume_from_checkpoint",
            "latest",
            "--max_train_steps",
            str(step + 3),
            "--skip_nonfinite_steps",
            "5",
            "--checkpointing_steps",
            "0",
        )
    )
    assert result.global_step == step + 3 and result.history[-1]["skipped_nonfinite_steps"] >= 1
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    # a budget that runs out stops with a message naming it
    with pytest.raises(Diverged, match="skip_nonfinite_steps: 1 skipped steps allowed, all used"):
        train(
            tiny_shapes(
                tmp_path / "other",
                "--resume_from_checkpoint",
                str(out / f"checkpoint-{step}"),
                "--skip_nonfinite_steps",
                "1",
            )
        )
    assert before.keys() == load_file(str(out / f"checkpoint-{step}" / TRAINABLE_FILE)).keys()


def test_pruning_keeps_the_newest_finite_checkpoint(tmp_path):
    for step, finite in ((2, True), (4, True), (6, False), (8, False)):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / STATE_FILE).write_text(json.dumps({"global_step": step, "finite": finite}))
    deleted = prune_checkpoints(tmp_path, 2)
    assert [p.name for p in deleted] == ["checkpoint-2"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]


def _start(cmd_out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]))
    cmd = [
        sys.executable,
        "-m",
        "soarflow",
        "train",
        "--task",
        "tests.train.toy_task:ToyTask",
        "--output_dir",
        str(cmd_out),
        "--train_batch_size",
        "4",
        "--max_train_steps",
        "1000000",
        "--report_to",
        "none",
        "--show_progress",
        "false",
        "--checkpointing_steps",
        "0",
        "--soar.num_aux",
        "2",
        "--soar.rollout_steps",
        "4",
        "--learning_rate",
        "1e-2",
        *extra,
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_current_step_and_resumes_bit_exactly(tmp_path, sig):
    out = tmp_path / "run"
    proc = _start(out)
    deadline = time.time() + 120
    while not (out / "config.yaml").exists():  # written just before the first step
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    (saved,) = list_checkpoints(out)
    step = int(saved.name.split("-")[1])
    assert step >= 1
    assert f"stopped by {sig.name} after step {step}" in stderr and "--resume_from_checkpoint latest" in stderr
    assert "Traceback" not in stderr

    common = ["--max_train_steps", str(step + 2), "--task", "tests.train.toy_task:ToyTask"]
    resumed = train(config(tmp_path, "run", *common, "--resume_from_checkpoint", "latest"))
    full = train(config(tmp_path, "full", *common))
    assert resumed.resumed_from == saved and resumed.global_step == step + 2
    assert_same(weights(full), weights(resumed))


@pytest.mark.parametrize("spelling", ["trailing_slash", "dot_slash", "absolute", "other_cwd", "moved"])
def test_resume_accepts_any_spelling_of_the_output_dir(tmp_path, monkeypatch, spelling):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies in step 3, after checkpoint-2
        train(
            config(Path("."), "runP", "--checkpointing_steps", "2", "--max_train_steps", "3"),
            task=ToyTask(fail_after=2),
        )
    name = {
        "trailing_slash": "runP/",
        "dot_slash": "./runP",
        "absolute": str(tmp_path / "runP"),
        "other_cwd": "../runP",
        "moved": "moved",
    }[spelling]
    if spelling == "other_cwd":
        (tmp_path / "elsewhere").mkdir()
        monkeypatch.chdir(tmp_path / "elsewhere")
    if spelling == "moved":
        (tmp_path / "runP").rename(tmp_path / "moved")
    cfg = load_config(
        None,
        [
            "--output_dir",
            name,
            "--train_batch_size",
            "4",
            "--max_train_steps",
            "3",
            "--report_to",
            "none",
            "--show_progress",
            "false",
            "--checkpointing_steps",
            "2",
            "--soar.num_aux",
            "2",
            "--soar.rollout_steps",
            "4",
            "--learning_rate",
            "1e-2",
            "--resume_from_checkpoint",
            "latest",
        ],
    )
    result = train(cfg, task=ToyTask())
    assert result.resumed_from is not None and result.global_step == 3
    folder = tmp_path / ("moved" if spelling == "moved" else "runP")
    assert not list(folder.glob("config.*.yaml"))  # nothing but the spelling changed: no config.1.yaml


def test_refusals_give_the_working_command(tmp_path):
    cfg = config(tmp_path, "run", "--checkpointing_steps", "3")
    train(cfg, task=ToyTask())
    with pytest.raises(
        ValueError,
        match=r"soarflow train --config .*config.yaml --output_dir .* "
        r"--resume_from_checkpoint latest",
    ):
        train(cfg.replace(learning_rate=5e-3, resume_from_checkpoint="latest"), task=ToyTask())
