"""Two CPU processes (gloo) through `accelerate launch` match one process on the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from launching import launch_two_processes
from safetensors.torch import load_file

from soarflow.train import load_config, train

from .toy_task import TWO_PROCESS_SOAR_RUN, ToyTask

WORKER = Path(__file__).with_name("dist_worker.py")
RUN = ["--max_train_steps", "2", *TWO_PROCESS_SOAR_RUN]


def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    launch_two_processes(str(WORKER), str(tmp_path / "dist"), "--train_batch_size", "2", *RUN, timeout=180)
    dist = json.loads((tmp_path / "dist" / "history.json").read_text())
    assert dist["num_processes"] == 2
    ckpt = tmp_path / "dist" / "run" / "checkpoint-2"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()

    single = train(
        load_config(None, ["--output_dir", str(tmp_path / "single"), "--train_batch_size", "4", *RUN]), task=ToyTask()
    )
    assert single.num_processes == 1
    for d, s in zip(dist["history"], single.history, strict=True):
        for key in ("loss", "main_loss", "aux_loss", "grad_norm", "num_aux_points"):
            assert abs(d[key] - s[key]) <= 1e-5 * max(1.0, abs(s[key])), (key, d[key], s[key])
    w_dist = load_file(str(tmp_path / "dist" / "run" / "model" / "toy.safetensors"))
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(w_dist[k], v, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)  # the trainer seeds the model init with `seed` (0)
    init = ToyTask().build_model().state_dict()
    assert not torch.allclose(w_dist["net.0.weight"], init["net.0.weight"])  # the runs did move the weights


def test_a_signal_on_one_process_stops_every_process_at_the_same_saved_step(tmp_path):
    env = {"SOARFLOW_TEST_SIGTERM_RANK1_AT": "3"}  # rank 1 gets SIGTERM in its 3rd micro-batch = step 3
    launch_two_processes(
        str(WORKER),
        str(tmp_path / "dist"),
        "--train_batch_size",
        "2",
        "--max_train_steps",
        "50",
        "--report_to",
        "none",
        "--show_progress",
        "false",
        "--checkpointing_steps",
        "0",
        "--soar.num_aux",
        "1",
        "--soar.rollout_steps",
        "4",
        env=env,
        timeout=180,
    )
    stops = [json.loads((tmp_path / "dist" / f"stopped_{r}.json").read_text()) for r in (0, 1)]
    assert stops[0]["step"] == stops[1]["step"] == 3
    assert stops[1]["signal"] == "SIGTERM" and "another process" in stops[0]["signal"]
    assert [p.name for p in (tmp_path / "dist" / "run").glob("checkpoint-*")] == ["checkpoint-3"]
