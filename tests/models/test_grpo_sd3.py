"""Flow-GRPO on the tiny random SD3 pipeline with LoRA: the KL reference is the transformer with its adapters
disabled, the run trains only the adapters and saves a diffusers LoRA."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers_testing import build_tiny_sd3_pipeline, make_imagefolder, tiny_train_args  # noqa: E402
from soarflow.models.lora import LORA_WEIGHTS  # noqa: E402
from soarflow.train import load_config, train  # noqa: E402


def brightness(images: torch.Tensor, prompts) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def test_tiny_sd3_lora_grpo_run(tmp_path):
    sd3 = build_tiny_sd3_pipeline(tmp_path / "pipe", variant="sd3")
    images = make_imagefolder(tmp_path / "imgs", sizes=((32, 32),))
    cfg = load_config(
        None,
        [
            *tiny_train_args(
                "sd3",
                tmp_path / "run",
                sd3,
                images,
                method="grpo",
                batch_size=4,
                checkpointing_steps=0,
                learning_rate="1e-2",
            ),
            "--grpo.group_size",
            "2",
            "--grpo.num_steps",
            "3",
            "--grpo.train_timesteps",
            "1",
            "--grpo.guidance_scale",
            "2.0",
            "--model.finetune=lora",
            "--model.lora={rank: 4, alpha: 8}",
        ],
    )
    with pytest.raises(ValueError, match="config key 'grpo.reward': task 'sd3' has no default reward"):
        train(cfg)
    result = train(cfg, reward=brightness)  # any callable reward(images, prompts) -> (B,)
    first, last = result.history
    assert first["kl"] == 0  # adapters start at B = 0: policy == reference
    assert last["kl"] > 0 and all(torch.isfinite(torch.tensor(v)) for v in last.values())
    assert last["forwards_per_sample"] == 2 * 3 + 2 * 1 + 2 * 1 and last["grad_forwards_per_sample"] == 2
    transformer = result.model.transformer
    assert not getattr(transformer, "_disable_adapters", False)  # the reference forward re-enabled them
    lora_b = [p for n, p in transformer.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    assert not any(p.requires_grad for n, p in transformer.named_parameters() if "lora" not in n)
    assert (result.output_dir / "model" / LORA_WEIGHTS).is_file()
