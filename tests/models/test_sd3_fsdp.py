"""SD3 (tiny, from tests/diffusers_testing.py) under accelerate's FSDP2 plugin with 2 CPU processes, through
`soarflow train` (tests/train/fsdp_worker.py keeps FSDP on CPU devices): each JointTransformerBlock is its own
FSDP unit; full fine-tuning and LoRA (frozen base and trainable adapters in the same units) train with EMA and
validation, and the gathered saves hold the weights of the same runs under DDP and load into diffusers' pipeline.
(DDP, not one process: the SD3 task draws the VAE posterior sample with each process's own generator, so only runs
with the same number of processes see the same latents.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from launching import launch_two_processes
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from diffusers_testing import build_tiny_sd3_pipeline, generate_tiny, make_imagefolder, tiny_train_args  # noqa: E402
from soarflow.models.lora import LORA_WEIGHTS  # noqa: E402

WORKER = Path(__file__).resolve().parents[1] / "train" / "fsdp_worker.py"


def _launch(mode: str, out: Path, *args: str) -> None:
    env = dict(
        FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
        FSDP_TRANSFORMER_CLS_TO_WRAP="JointTransformerBlock",
    )
    proc = launch_two_processes(str(WORKER), str(out), mode, *args, env=env, timeout=600)
    assert "2 process(es)" in proc.stdout + proc.stderr


def _args(out: Path, sd3: Path, images: Path, finetune: str) -> list[str]:
    return [
        *tiny_train_args(
            "sd3",
            out,
            sd3,
            images,
            method="soar",
            batch_size=1,
            learning_rate="1e-3",
            validation_prompts=["a red circle"],
        ),
        "--validation_steps",
        "2",
        "--soar.num_aux",
        "2",
        "--soar.rollout_steps",
        "3",
        "--use_ema",
        "--ema_decay",
        "0.5",
        # Adam divides by sqrt(v) + eps: at eps 1e-8 an element whose gradient is near 0 moves by about lr
        # whatever its sign, so FSDP's and DDP's different reduction order can flip it (up to 5.5% of lora_B's
        # elements in CI). At eps 1e-3 the step is linear in small gradients: lora_B then differed by at most
        # 7e-6, 2.8e-5 and 1.3e-4 (1 element of 128) in three runs (2026-12-07), against up to 9e-4 at eps 1e-8.
        "--adam_epsilon",
        "1e-3",
        f"--model.finetune={finetune}",
        "--model.lora={rank: 4, alpha: 8}",
    ]


@pytest.mark.slow
def test_sd3_full_and_lora_under_fsdp2_save_what_diffusers_loads(tmp_path):
    sd3 = build_tiny_sd3_pipeline(tmp_path / "pipe", variant="sd3")
    images = make_imagefolder(tmp_path / "imgs", sizes=((32, 32),))
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    for finetune in ("full", "lora"):  # each run in fresh processes, under FSDP2 and then under DDP
        _launch("cli", fsdp, *_args(fsdp / finetune, sd3, images, finetune))
        _launch("ddp-cli", ddp, *_args(ddp / finetune, sd3, images, finetune))

    # full fine-tune: the gathered transformer folder equals the DDP run's and loads into the pipeline
    transformer = SD3Transformer2DModel.from_pretrained(str(fsdp / "full" / "model" / "transformer"))
    expected = SD3Transformer2DModel.from_pretrained(str(ddp / "full" / "model" / "transformer")).state_dict()
    assert transformer.state_dict().keys() == expected.keys()
    for name, w in transformer.state_dict().items():
        torch.testing.assert_close(w, expected[name], rtol=1e-4, atol=1e-5)
    base = SD3Transformer2DModel.from_pretrained(str(sd3), subfolder="transformer")
    assert not torch.equal(base.pos_embed.proj.weight, transformer.pos_embed.proj.weight)
    assert (fsdp / "full" / "validation" / "step_000002.png").is_file()
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3), transformer=transformer)
    image = generate_tiny(pipe, "a red circle", output_type="pt", generator=torch.Generator().manual_seed(0))
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()

    # LoRA: only the adapters were saved, equal to the DDP run's, and load_lora_weights takes them
    saved = load_file(str(fsdp / "lora" / "model" / LORA_WEIGHTS))
    expected = load_file(str(ddp / "lora" / "model" / LORA_WEIGHTS))
    assert saved.keys() == expected.keys() and saved
    for k, v in expected.items():
        diff = (saved[k] - v).abs()
        assert (diff > 1e-4).float().mean() <= 0.05 and diff.max() <= 1e-3, (k, diff.max())
    # B starts at 0: training moved it, by several times that tolerance
    assert max(v.abs().max() for k, v in saved.items() if "lora_B" in k) > 5e-4
    ckpt = load_file(str(fsdp / "lora" / "checkpoint-2" / "trainable_params.safetensors"))
    assert ckpt and all("lora_" in k for k in ckpt)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3))
    pipe.load_lora_weights(str(fsdp / "lora" / "model"))
    image = generate_tiny(pipe, "a dog", output_type="pt")
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
