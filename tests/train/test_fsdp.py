"""Two CPU processes (gloo) under accelerate's FSDP2 plugin, through the real trainer (see fsdp_worker.py for how
FSDP is kept on CPU devices): the parameters are sharded, the loss and the final (EMA) weights equal one process's
on the same global batch, validation runs on every rank, resume is exact, and the saves are whole models."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from launching import launch_two_processes
import torch
from safetensors.torch import load_file

from soarflow.train import load_config, train

from .toy_task import TWO_PROCESS_SOAR_RUN, ToyTask

WORKER = Path(__file__).with_name("fsdp_worker.py")
RUN = [
    "--max_train_steps",
    "3",
    *TWO_PROCESS_SOAR_RUN,
    "--use_ema",
    "--ema_decay",
    "0.9",
    "--max_grad_norm",
    "1.0",
    "--validation_steps",
    "2",
]


def launch(out: Path, mode: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return launch_two_processes(str(WORKER), str(out), mode, *args, timeout=timeout)


def test_fsdp2_two_processes_match_one_process_resume_exactly_and_save_whole_weights(tmp_path):
    launch(tmp_path / "fsdp", "toy", "--train_batch_size", "2", *RUN)
    launch(tmp_path / "fsdp", "toy-resume", "--train_batch_size", "2", *RUN)
    dist = json.loads((tmp_path / "fsdp" / "run.json").read_text())
    resumed_history = json.loads((tmp_path / "fsdp" / "resumed.json").read_text())["history"]
    assert dist["num_processes"] == 2 and dist["sharded"]  # FSDP2 DTensor parameters, not DDP

    single = train(
        load_config(None, ["--output_dir", str(tmp_path / "single"), "--train_batch_size", "4", *RUN]), task=ToyTask()
    )
    assert len(dist["history"]) == len(single.history) == 3
    for d, s in zip(dist["history"], single.history, strict=True):
        for key in ("loss", "main_loss", "aux_loss", "grad_norm", "num_aux_points"):
            assert abs(d[key] - s[key]) <= 1e-5 * max(1.0, abs(s[key])), (key, d[key], s[key])

    # the final save gathered the shards: the whole EMA weights, equal to the one-process run's
    run = tmp_path / "fsdp" / "run"
    final = load_file(str(run / "model" / "toy.safetensors"))
    expected = single.model.state_dict()
    assert final.keys() == expected.keys()
    for k, v in expected.items():
        assert final[k].shape == v.shape, k
        torch.testing.assert_close(final[k], v, rtol=1e-5, atol=1e-6)

    # checkpoints hold whole trainable tensors (gathered), and resuming from step 1 ends on the same weights
    ckpt = load_file(str(run / "checkpoint-3" / "trainable_params.safetensors"))
    assert {k: v.shape for k, v in ckpt.items()} == {k: v.shape for k, v in expected.items()}
    resumed = load_file(str(tmp_path / "fsdp" / "resumed" / "model" / "toy.safetensors"))
    for k, v in final.items():
        torch.testing.assert_close(resumed[k], v, rtol=1e-6, atol=1e-7)
    for d, r in zip(dist["history"][1:], resumed_history, strict=True):
        assert d["step"] == r["step"] and abs(d["loss"] - r["loss"]) <= 1e-6 * max(1.0, abs(d["loss"]))

    # validation ran on both ranks (a sharded forward needs both) and rank 0 wrote the grids
    assert [Path(p).name for p in dist["validation_images"]] == ["step_000002.png", "step_000003.png"]
    assert all(Path(p).is_file() for p in dist["validation_images"])
    torch.manual_seed(0)
    init = ToyTask().build_model().state_dict()
    assert not torch.allclose(final["net.0.weight"], init["net.0.weight"])  # training moved the weights


def test_shipped_sharded_accelerate_configs_parse_as_fsdp2_and_zero():
    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
    fsdp = load_config_from_file(str(root / "fsdp_8gpu.yaml"))
    assert str(fsdp.distributed_type).endswith("FSDP") and fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_reshard_after_forward"] is True  # FULL_SHARD
    nodes = load_config_from_file(str(root / "fsdp_2nodes_16gpu.yaml"))
    assert (nodes.num_machines, nodes.num_processes, nodes.fsdp_config["fsdp_version"]) == (2, 16, 2)
    for stage in (2, 3):
        ds = load_config_from_file(str(root / f"deepspeed_zero{stage}_8gpu.yaml"))
        assert str(ds.distributed_type).endswith("DEEPSPEED") and ds.deepspeed_config["zero_stage"] == stage
    assert load_config_from_file(str(root / "deepspeed_zero3_8gpu.yaml")).deepspeed_config["zero3_save_16bit_model"]


def test_fsdp1_and_zero3_with_ema_are_refused_naming_the_setting():
    from types import SimpleNamespace

    from soarflow.train.distributed import Layout, check_supported

    fsdp1 = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)))
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        check_supported(Layout("fsdp", 2, sharded=True), fsdp1, SimpleNamespace(use_ema=False))
    fsdp2 = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2)))
    check_supported(Layout("fsdp", 2, sharded=True), fsdp2, SimpleNamespace(use_ema=True))
    with pytest.raises(ValueError, match="use_ema with DeepSpeed ZeRO-3"):
        check_supported(Layout("deepspeed", 2, sharded=True, zero_stage=3), None, SimpleNamespace(use_ema=True))
    check_supported(Layout("deepspeed", 2, zero_stage=2), None, SimpleNamespace(use_ema=True))


def test_who_validates_and_a_backend_that_cannot_skip_a_step():
    from types import SimpleNamespace

    from soarflow.train.distributed import Layout, validates, writes_files
    from soarflow.train.safety import Diverged, StepGuard

    main, other = SimpleNamespace(is_main_process=True), SimpleNamespace(is_main_process=False)
    assert validates(Layout("ddp", 2), main) and not validates(Layout("ddp", 2), other)
    assert validates(Layout("fsdp", 2, sharded=True), other)  # a sharded forward needs every rank
    assert writes_files(main) and not writes_files(other)
    assert (
        not Layout("deepspeed", 2, zero_stage=2).can_skip_updates and Layout("fsdp", 2, sharded=True).can_skip_updates
    )

    one = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    guard = StepGuard(budget=3, device="cpu")
    guard.saw_loss(torch.tensor(float("nan")))
    assert guard.decide(one, torch.tensor(1.0), False, step=1) == (True, False) and guard.skipped == 1
    deepspeed = StepGuard(budget=3, device="cpu", can_skip=False)
    deepspeed.saw_loss(torch.tensor(float("nan")))
    with pytest.raises(Diverged, match="cannot skip"):
        deepspeed.decide(one, None, False, step=1)
