"""FLUX.1 adapter on tiny random pipelines loaded from disk: packing, guidance modes, SOAR/SFT through the
trainer (LoRA with embedded guidance, full fine-tune with two-pass CFG), resume, and pipeline round trips."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import FluxPipeline, FluxTransformer2DModel  # noqa: E402

from soarflow.models.diffusers_weights import MANIFEST  # noqa: E402
from diffusers_testing import (  # noqa: E402
    TINY_GENERATION_ARGS,
    build_tiny_flux_pipeline,
    generate_tiny,
    tiny_train_args,
)
from soarflow.tasks.flux import FluxTask, FluxVelocity, image_ids, pack_latents, unpack_latents  # noqa: E402
from soarflow.objective import SOARConfig, soar_loss  # noqa: E402
from soarflow.train import load_config, train  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dev_path(tmp_path_factory):
    """Guidance-distilled (like FLUX.1-dev)."""
    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "dev", guidance_embeds=True)


@pytest.fixture(scope="module")
def plain_path(tmp_path_factory):
    """No guidance embedding (trained with condition dropout; two-pass CFG)."""
    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "plain", guidance_embeds=False, seed=1)


def make_task(path, images, train_config=None, **model):
    return FluxTask.from_config(
        {"pretrained": str(path), "max_sequence_length": 8, **model},
        {"path": str(images), "resolution": 32, "validation_prompts": ["a red circle"], "validation_num_steps": 2},
        train_config,
    )


def run_config(tmp_path, name, path, images, *extra):
    return load_config(
        None,
        [
            *tiny_train_args(
                "flux", tmp_path / name, path, images, learning_rate="1e-3", validation_prompts=["a red circle"]
            ),
            "--soar.num_aux",
            "2",
            "--soar.rollout_steps",
            "4",
            *extra,
        ],
    )


def test_packing_matches_the_pipeline_layout():
    x = torch.randn(2, 4, 6, 8)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 4, 6, 8))
    torch.testing.assert_close(unpack_latents(packed, 6, 8), x)
    torch.testing.assert_close(
        image_ids(6, 8, "cpu"), FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    )
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 4, 5, 8))


def test_velocity_and_embedded_guidance(dev_path, images):
    task = make_task(dev_path, images, guidance="embedded", embedded_guidance_scale=3.5)
    model = task.build_model()
    assert isinstance(model, FluxVelocity)
    batch = task.collate([task.train_dataset()[i] for i in range(2)])
    x0, cond = task.encode_batch(batch, CPU)
    assert x0.shape == (2, 4, 32, 32) and cond["pooled_projections"].shape == (2, 32)
    torch.testing.assert_close(cond["guidance"], torch.full((2,), 3.5))
    assert task.null_cond(2, CPU)["guidance"].shape == (2,)
    sigma = torch.tensor([0.3, 0.9])
    direct = model.transformer(
        hidden_states=pack_latents(x0),
        encoder_hidden_states=cond["encoder_hidden_states"],
        pooled_projections=cond["pooled_projections"],
        timestep=sigma,
        guidance=cond["guidance"],
        img_ids=image_ids(32, 32, "cpu"),
        txt_ids=torch.zeros(8, 3),
    ).sample
    v = model(x0, sigma, cond)
    torch.testing.assert_close(v, unpack_latents(direct, 32, 32))
    other = model(x0, sigma, {**cond, "guidance": torch.full((2,), 1.0)})
    assert not torch.allclose(v, other)  # the guidance input matters
    with pytest.raises(ValueError, match="guidance"):
        model(x0, sigma, {k: c for k, c in cond.items() if k != "guidance"})


def test_guidance_mode_is_checked(dev_path, plain_path, images):
    soar = load_config(None, ["--task", "flux", "--soar.guidance_scale", "4.5"])
    with pytest.raises(ValueError, match="soar.guidance_scale"):
        make_task(dev_path, images, train_config=soar, guidance="embedded")
    # embedded guidance: validation guides with the embedded scale, stated, not silently replaced
    assert make_task(dev_path, images, guidance="embedded").validation_guidance_scale == 1.0
    with pytest.raises(ValueError, match="data.validation_guidance_scale"):
        FluxTask.from_config(
            {"pretrained": str(dev_path), "guidance": "embedded"},
            {"path": str(images), "validation_guidance_scale": 4.5},
        )
    with pytest.raises(ValueError, match="model.guidance"):
        make_task(plain_path, images, guidance="embedded").build_model()
    plain = make_task(plain_path, images, guidance="cfg")
    model = plain.build_model()
    batch = plain.collate([plain.train_dataset()[0]])
    x0, cond = plain.encode_batch(batch, CPU)
    assert "guidance" not in cond
    out = soar_loss(
        model,
        x0,
        cond,
        null_cond=plain.null_cond(1, CPU),
        config=SOARConfig(num_aux=1, rollout_steps=4, guidance_scale=3.0),
    )
    assert torch.isfinite(out.loss)


def test_lora_soar_with_embedded_guidance_trains_resumes_and_loads(tmp_path, dev_path, images):
    args = (
        "--model.finetune=lora",
        "--model.guidance=embedded",
        "--model.lora={rank: 4, alpha: 4}",
        "--soar.guidance_scale",
        "1",
        "--validation_steps",
        "2",
    )
    result = train(run_config(tmp_path, "lora", dev_path, images, *args))
    assert result.global_step == 2 and result.history[-1]["num_aux_points"] == 4
    resumed = train(
        run_config(
            tmp_path,
            "resumed",
            dev_path,
            images,
            *args,
            "--resume_from_checkpoint",
            str(tmp_path / "lora" / "checkpoint-1"),
        )
    )
    a = {n: p for n, p in result.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and all("lora_" in n for n in a)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-4, atol=1e-6)

    model_dir = result.output_dir / "model"
    manifest = json.loads((model_dir / MANIFEST).read_text())
    assert manifest["family"] == "flux" and manifest["guidance"] == "embedded"
    pipe = FluxPipeline.from_pretrained(str(dev_path))
    pipe.load_lora_weights(str(model_dir))
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    task = make_task(dev_path, images, guidance="embedded")
    cond = task.finish_cond(task.encode_text(["a dog"], CPU))
    sigma = torch.tensor([0.5])
    ours = result.model(x, sigma, cond)
    theirs = FluxVelocity(pipe.transformer)(x, sigma, cond)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    image = generate_tiny(pipe, "a dog", guidance_scale=3.5, output_type="pt")
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_full_sft_with_cfg_saves_a_transformer_the_pipeline_uses(tmp_path, plain_path, images):
    result = train(run_config(tmp_path, "full", plain_path, images, "--method", "sft", "--model.guidance=cfg"))
    model_dir = result.output_dir / "model"
    transformer = FluxTransformer2DModel.from_pretrained(str(model_dir / "transformer"))
    base = FluxTransformer2DModel.from_pretrained(str(plain_path), subfolder="transformer")
    assert not torch.equal(transformer.x_embedder.weight, base.x_embedder.weight)
    torch.testing.assert_close(transformer.x_embedder.weight, result.model.transformer.x_embedder.weight.detach())
    pipe = FluxPipeline.from_pretrained(str(plain_path), transformer=transformer)
    image = generate_tiny(pipe, "a cat", negative_prompt="", true_cfg_scale=2.0, output_type="pt")
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()

    from soarflow.commands.sample import main

    out = tmp_path / "samples"
    assert (
        main(
            [
                "--model",
                str(model_dir),
                "--prompt",
                "a cat",
                "--output_dir",
                str(out),
                "--guidance_scale",
                "2",
                *TINY_GENERATION_ARGS,
            ]
        )
        == 0
    )
    assert (out / "000.png").is_file()
    assert main(["--model", str(tmp_path / "nowhere"), "--prompt", "x", "--output_dir", str(out)]) == 2
