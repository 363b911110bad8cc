"""ema_device: cpu — the EMA's shadow weights live in host memory, are updated from the device parameters, and give
the same EMA as shadow weights on the device (on a CUDA machine the parameters really are on the GPU)."""

from __future__ import annotations

import pytest
import torch

from soarflow.train import load_config, train
from soarflow.train import trainer as trainer_module
from soarflow.train.ema import EMA

from .test_trainer import config, weights
from .toy_task import ToyTask

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_cpu_shadow_weights_follow_the_device_parameters():
    g = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(5, 3, generator=g).to(DEVICE)),
        torch.nn.Parameter(torch.randn(7).to(DEVICE)),
    ]
    on_device, on_cpu = EMA(params, decay=0.9), EMA(params, decay=0.9, device="cpu")
    assert all(s.device.type == "cpu" for s in on_cpu.shadow_params)
    assert all(s.data_ptr() != p.data_ptr() for s, p in zip(on_cpu.shadow_params, params))  # copies, not views
    for _ in range(6):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g).to(DEVICE))
        on_device.step(params)
        on_cpu.step(params)
    for a, b in zip(on_device.shadow_params, on_cpu.shadow_params):
        assert b.device.type == "cpu"
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-7)
    # the CPU EMA differs from the current weights (it really averaged), and swapping it in and back works
    assert not torch.allclose(on_cpu.shadow_params[0], params[0].detach().cpu())
    before = [p.detach().clone() for p in params]
    on_cpu.store(params)
    on_cpu.copy_to(params)
    torch.testing.assert_close(params[0].detach().cpu(), on_cpu.shadow_params[0])
    on_cpu.restore(params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_trainer_with_ema_device_cpu_gives_the_same_model(tmp_path, monkeypatch):
    made = []
    real = trainer_module.create_ema

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(trainer_module, "create_ema", recording)
    common = ("--use_ema", "--ema_decay", "0.9", "--checkpointing_steps", "2", "--max_train_steps", "4")
    default = train(config(tmp_path, "acc", *common), task=ToyTask())
    on_cpu = train(config(tmp_path, "cpu", *common, "--ema_device", "cpu"), task=ToyTask())
    assert made[0].device is None and made[1].device == torch.device("cpu")
    assert all(s.device.type == "cpu" for s in made[1].shadow_params)
    a, b = weights(default), weights(on_cpu)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    # resuming a cpu-EMA run from its checkpoint restores the shadow weights there and finishes the same
    resumed = train(
        config(
            tmp_path,
            "cpu_resumed",
            *common,
            "--ema_device",
            "cpu",
            "--resume_from_checkpoint",
            str(tmp_path / "cpu" / "checkpoint-2"),
        ),
        task=ToyTask(),
    )
    assert made[2].device == torch.device("cpu")
    for k, v in weights(resumed).items():
        torch.testing.assert_close(v, b[k], rtol=1e-6, atol=1e-7)


def test_ema_device_is_checked():
    with pytest.raises(ValueError, match="ema_device"):
        load_config(None, ["--ema_device", "gpu"])
