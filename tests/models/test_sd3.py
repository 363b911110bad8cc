"""SD3 / SD3.5 adapter on tiny random pipelines written to disk and loaded back the way a user's path is:
velocity wrapper, text/VAE encoding, SOAR + SFT through the trainer (full and LoRA), resume, saving that a
diffusers pipeline loads back, `soarflow sample`, caching and config errors."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline  # noqa: E402

from soarflow.models.diffusers_weights import MANIFEST  # noqa: E402
from diffusers_testing import (  # noqa: E402
    TINY_GENERATION_ARGS,
    build_tiny_sd3_pipeline,
    generate_tiny,
    make_imagefolder,
    tiny_train_args,
)
from launching import launch_two_processes  # noqa: E402
from soarflow.models.lora import LORA_WEIGHTS  # noqa: E402
from soarflow.tasks.sd3 import SD3Task, SD3Velocity  # noqa: E402
from soarflow.objective import SOARConfig, sft_loss, soar_loss  # noqa: E402
from soarflow.train import load_config, train  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data") / "imgs", sizes=((40, 48), (32, 32)))


def model_section(path, **kw):
    return {"pretrained": str(path), "max_sequence_length": 8, **kw}


def data_section(images, **kw):
    return {
        "path": str(images),
        "resolution": 32,
        "validation_prompts": ["a red circle"],
        "validation_num_steps": 2,
        **kw,
    }


def make_task(sd3_path, images, model=None, data=None, train_config=None):
    return SD3Task.from_config(
        model_section(sd3_path, **(model or {})), data_section(images, **(data or {})), train_config
    )


def run_config(tmp_path, name, sd3_path, images, *extra, finetune="full", method="soar"):
    return load_config(
        None,
        [
            *tiny_train_args(
                "sd3",
                tmp_path / name,
                sd3_path,
                images,
                method=method,
                learning_rate="1e-3",
                validation_prompts=["a red circle"],
            ),
            "--soar.num_aux",
            "2",
            "--soar.rollout_steps",
            "4",
            "--soar.guidance_scale",
            "2.0",
            f"--model.finetune={finetune}",
            "--model.lora={rank: 4, alpha: 8}",
            *extra,
        ],
    )


def test_velocity_is_the_transformer_at_timestep_1000_sigma(sd3_path, images):
    task = make_task(sd3_path, images)
    model = task.build_model()
    assert isinstance(model, SD3Velocity)
    batch = task.collate([task.train_dataset()[i] for i in range(2)])
    x0, cond = task.encode_batch(batch, CPU)
    assert x0.shape == (2, 4, 32, 32)
    assert cond["encoder_hidden_states"].shape == (2, 77 + 8, 32) and cond["pooled_projections"].shape == (2, 64)
    sigma = torch.tensor([0.25, 0.8])
    direct = model.transformer(
        hidden_states=x0,
        encoder_hidden_states=cond["encoder_hidden_states"],
        pooled_projections=cond["pooled_projections"],
        timestep=sigma * 1000,
    ).sample
    torch.testing.assert_close(model(x0, sigma, cond), direct)
    # the condition is the pipeline's own prompt encoding; the null condition is the empty prompt's
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_path), transformer=None)
    embeds, _, pooled, _ = pipe.encode_prompt(
        batch["caption"], None, None, do_classifier_free_guidance=False, max_sequence_length=8
    )
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    torch.testing.assert_close(cond["pooled_projections"], pooled)
    null = task.null_cond(3, CPU)
    e0, _, p0, _ = pipe.encode_prompt("", None, None, do_classifier_free_guidance=False, max_sequence_length=8)
    assert null["encoder_hidden_states"].shape[0] == 3
    torch.testing.assert_close(null["encoder_hidden_states"][2:], e0)
    torch.testing.assert_close(null["pooled_projections"][:1], p0)


def test_latents_use_vae_shift_and_scale(sd3_path, images):
    task = make_task(sd3_path, images)
    batch = task.collate([task.train_dataset()[0]])
    vae = task.pipeline.get(CPU).vae
    mean = vae.encode(batch["pixel_values"]).latent_dist.mean
    torch.manual_seed(0)
    x0, _ = task.encode_batch(batch, CPU)
    expected = (mean - vae.config.shift_factor) * vae.config.scaling_factor
    # x0 is a posterior sample: its distance to the scaled mean is std * scale * N(0, 1)
    z = (x0 - expected) / (vae.encode(batch["pixel_values"]).latent_dist.std * vae.config.scaling_factor)
    assert abs(float(z.mean())) < 0.2 and 0.8 < float(z.std()) < 1.2
    decoded = task.decode(expected)
    assert decoded.shape == (1, 3, 32, 32) and decoded.min() >= -1 and decoded.max() <= 1


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_soar_and_sft_losses_give_gradients_only_to_trainable_weights(sd3_path, images, finetune):
    task = make_task(sd3_path, images, model={"finetune": finetune, "lora": {"rank": 4}})
    model = task.build_model()
    batch = task.collate([task.train_dataset()[i] for i in range(2)])
    x0, cond = task.encode_batch(batch, CPU)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if finetune == "lora":
        assert trainable and all("lora_" in n for n in trainable)
        assert any("add_q_proj.lora_A" in n for n in trainable) and any("to_out.0.lora_B" in n for n in trainable)
    else:
        assert trainable == {n for n, _ in model.named_parameters()}
    for loss_fn in (soar_loss, sft_loss):
        model.zero_grad()
        kw = {"null_cond": task.null_cond(2, CPU)}
        out = loss_fn(model, x0, cond, config=SOARConfig(num_aux=2, rollout_steps=4, guidance_scale=2.0), **kw)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        grads = [p.grad for n, p in model.named_parameters() if n in trainable]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    if finetune == "soar":
        assert out.num_aux_points == 4


def test_sd35_variant_with_dual_attention_and_qk_norm(tmp_path, images):
    path = build_tiny_sd3_pipeline(tmp_path / "sd35", variant="sd35")
    task = make_task(path, images, model={"finetune": "lora", "lora": {"rank": 2}})
    model = task.build_model()
    assert model.transformer.config.qk_norm == "rms_norm"
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".attn2.to_q.lora_A" in n for n in names)  # the dual-attention branch gets adapters too
    batch = task.collate([task.train_dataset()[i] for i in range(2)])
    x0, cond = task.encode_batch(batch, CPU)
    out = soar_loss(model, x0, cond, null_cond=task.null_cond(2, CPU), config=SOARConfig(num_aux=1, rollout_steps=4))
    out.loss.backward()
    assert torch.isfinite(out.loss)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_full_finetune_soar_trains_resumes_and_loads_into_a_pipeline(tmp_path, sd3_path, images):
    result = train(run_config(tmp_path, "full", sd3_path, images, "--validation_steps", "2"))
    assert result.global_step == 2 and len(result.history) == 2
    assert result.history[0]["num_aux_points"] == 4
    assert (tmp_path / "full" / "checkpoint-1").is_dir() and result.validation_images
    base = SD3Transformer2DModel.from_pretrained(str(sd3_path), subfolder="transformer")
    trained = result.model.transformer
    assert not torch.equal(base.pos_embed.proj.weight, trained.pos_embed.proj.weight)

    # resume from step 1 into a new folder: the same final weights as the uninterrupted run
    resumed = train(
        run_config(
            tmp_path,
            "resumed",
            sd3_path,
            images,
            "--validation_steps",
            "2",
            "--resume_from_checkpoint",
            str(tmp_path / "full" / "checkpoint-1"),
        )
    )
    assert resumed.global_step == 2
    for name, w in _weights(result.model).items():
        torch.testing.assert_close(_weights(resumed.model)[name], w, rtol=1e-4, atol=1e-6)

    # the saved folder loads into a diffusers pipeline that generates an image
    model_dir = result.output_dir / "model"
    manifest = json.loads((model_dir / MANIFEST).read_text())
    assert manifest["family"] == "sd3" and manifest["finetune"] == "full"
    transformer = SD3Transformer2DModel.from_pretrained(str(model_dir / "transformer"))
    for name, p in trained.named_parameters():
        torch.testing.assert_close(transformer.state_dict()[name], p.detach())
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_path), transformer=transformer)
    image = generate_tiny(pipe, "a red circle", output_type="pt", generator=torch.Generator().manual_seed(0))
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()

    # load_model_weights restores the saved weights into a freshly built model
    task = make_task(sd3_path, images)
    fresh = task.build_model()
    task.load_model_weights(fresh, model_dir)
    torch.testing.assert_close(fresh.transformer.pos_embed.proj.weight, trained.pos_embed.proj.weight)


def test_lora_sft_saves_diffusers_lora_that_pipeline_loads(tmp_path, sd3_path, images):
    result = train(
        run_config(tmp_path, "lora", sd3_path, images, "--gradient_checkpointing", finetune="lora", method="sft")
    )
    assert result.model.transformer.gradient_checkpointing
    model_dir = result.output_dir / "model"
    assert (model_dir / LORA_WEIGHTS).is_file()
    assert not (model_dir / "transformer").exists()
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # B starts at 0: training moved it

    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_path))
    pipe.load_lora_weights(str(model_dir))
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    task = make_task(sd3_path, images)
    cond = task.encode_text(["a red circle"], CPU)
    sigma = torch.tensor([0.6])
    ours = result.model(x, sigma, cond)
    theirs = pipe.transformer(
        hidden_states=x,
        encoder_hidden_states=cond["encoder_hidden_states"],
        pooled_projections=cond["pooled_projections"],
        timestep=sigma * 1000,
    ).sample
    base = SD3Velocity(SD3Transformer2DModel.from_pretrained(str(sd3_path), subfolder="transformer"))(x, sigma, cond)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)  # alpha/rank scale survives the round trip
    assert not torch.allclose(base, ours, atol=1e-6)
    image = generate_tiny(pipe, "a dog", output_type="pt")
    assert image.shape == (1, 3, 32, 32)

    # load_model_weights into a fresh LoRA model reproduces the trained velocity
    task = make_task(sd3_path, images, model={"finetune": "lora", "lora": {"rank": 4, "alpha": 8}})
    fresh = task.build_model()
    task.load_model_weights(fresh, model_dir)
    torch.testing.assert_close(fresh(x, sigma, cond), ours, rtol=1e-4, atol=1e-5)

    # `soarflow sample` from the saved LoRA folder and from a checkpoint folder
    from soarflow.commands.sample import main

    out = tmp_path / "samples"
    assert (
        main(["--model", str(result.output_dir), "--prompt", "a cat", "--output_dir", str(out), *TINY_GENERATION_ARGS])
        == 0
    )
    assert (out / "000.png").is_file()
    checkpoint = result.output_dir / "checkpoint-2"
    assert main(["--model", str(checkpoint), "--prompt", "a cat", "--output_dir", str(out), *TINY_GENERATION_ARGS]) == 0
    assert (out / "001.png").is_file()  # earlier samples are kept
    assert json.loads((out / "prompts.json").read_text()) == {"000.png": "a cat", "001.png": "a cat"}

    # `soarflow eval` from the run folder applies the LoRA: its image differs from the base pipeline's
    from soarflow.commands.eval import build_parser, run

    (tmp_path / "p.txt").write_text("a cat\n")
    common = ["--suite", "file", "--prompts_file", str(tmp_path / "p.txt"), *TINY_GENERATION_ARGS]
    mean = {"mean": lambda images, prompts: images.mean((1, 2, 3))}
    lora = run(
        build_parser().parse_args(["--model", str(result.output_dir), "--output_dir", str(tmp_path / "e1"), *common]),
        mean,
    )
    base = run(
        build_parser().parse_args(["--model", str(sd3_path), "--output_dir", str(tmp_path / "e2"), *common]), mean
    )
    assert lora["images"][0]["file"] == base["images"][0]["file"] == "images/00000_0000.png"
    assert lora["images"][0]["scores"]["mean"] != base["images"][0]["scores"]["mean"]


def test_encoding_cache_skips_the_encoders_and_is_keyed_by_resolution(tmp_path, sd3_path, images):
    data = {"cache_dir": str(tmp_path / "cache"), "cache_shard_size": 2, "cache_dtype": "float32"}
    task = make_task(sd3_path, images, data=data)
    batch = task.collate([task.train_dataset()[i] for i in range(2)])
    x0, cond = task.encode_batch(batch, CPU)
    assert len(list((tmp_path / "cache").glob("latent-*/shard-*.safetensors"))) == 1  # 2 images = one shard
    null = task.null_cond(2, CPU)
    for cache in task.caches():
        cache.flush()

    again = make_task(sd3_path, images, data=data)

    def no_encoders(*args, **kwargs):
        raise AssertionError("the encoders were loaded although the cache holds the batch")

    again.pipeline.get = no_encoders
    x1, cond1 = again.encode_batch(batch, CPU)
    torch.testing.assert_close(cond1, cond)
    torch.testing.assert_close(again.null_cond(2, CPU), null)
    assert x1.shape == x0.shape and not torch.equal(x1, x0)  # a fresh draw from the cached VAE posterior
    shift, scale = again.pipeline.vae_factors()
    assert abs(float((x1 - x0).mean())) < 0.5 * scale

    other = make_task(sd3_path, images, data={**data, "resolution": 16})
    other.encode_batch(other.collate([other.train_dataset()[0]]), CPU)
    other.cache().flush()
    names = set(other.cache().location)  # same latent folder: entries are named by image hash and crop size
    assert any(n.endswith("-16x16") for n in names) and sum(n.endswith("-32x32") for n in names) == 2


def test_config_errors_name_the_key(sd3_path, images):
    with pytest.raises(ValueError, match="model.finetun"):
        SD3Task.from_config(model_section(sd3_path, finetun="lora"), data_section(images))
    with pytest.raises(ValueError, match="model.pretrained"):
        SD3Task.from_config({}, data_section(images))
    with pytest.raises(ValueError, match="model.lora.rank"):
        SD3Task.from_config(model_section(sd3_path, lora={"rank": 0}), data_section(images))
    with pytest.raises(ValueError, match="data.cache_dir"):
        SD3Task.from_config(model_section(sd3_path), data_section(images, cache_dir="/tmp/x", random_flip=True))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        SD3Task.from_config(model_section(images), data_section(images)).build_model()
    with pytest.raises(ValueError, match="target_modules"):
        SD3Task.from_config(
            model_section(sd3_path, finetune="lora", lora={"target_modules": ["nope"]}), data_section(images)
        ).build_model()


@pytest.mark.parametrize(
    "name",
    [
        "sd35_medium_soar",
        "sd35_medium_sft",
        "sd35_medium_soar_lora_24gb",
        "flux_dev_soar_lora",
        "sd35_medium_grpo_geneval",
    ],
)
def test_shipped_recipes_are_valid_configs(name):
    from pathlib import Path

    from soarflow.tasks.registry import get_task_class

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "configs" / f"{name}.yaml")
    task = get_task_class(cfg.task).from_config(cfg.model, cfg.data, cfg)
    assert task.data_config.resolution == 512 and cfg.mixed_precision == "bf16"
    if task.data_config.format != "prompts":  # a prompt-only GRPO recipe has no images to cache
        assert task.data_config.cache_dir  # every image recipe trains from the encoder cache (soarflow cache)
    objective = cfg.soar
    assert objective.num_aux == 6 and objective.num_rollout_paths == 1 and objective.t_density == "logit_normal"
    if name.startswith("sd35_medium_so"):
        assert objective.guidance_scale == 4.5 and objective.rollout_steps == 40 and objective.shift == 3.0
    if name in ("sd35_medium_soar", "sd35_medium_sft"):
        assert cfg.learning_rate == 2e-5 and cfg.lr_scheduler == "constant" and cfg.train_batch_size * 8 == 32


def test_shipped_accelerate_configs_load():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
    kinds = {
        name: str(load_config_from_file(str(root / f"{name}.yaml")).distributed_type).split(".")[-1]
        for name in ("ddp_8gpu", "fsdp_8gpu", "deepspeed_zero2_8gpu")
    }
    assert kinds == {"ddp_8gpu": "MULTI_GPU", "fsdp_8gpu": "FSDP", "deepspeed_zero2_8gpu": "DEEPSPEED"}


def test_lora_with_bf16_frozen_base_keeps_float32_adapters(sd3_path, images):
    task = make_task(sd3_path, images, model={"finetune": "lora", "frozen_dtype": "bfloat16", "lora": {"rank": 2}})
    model = task.build_model()
    dtypes = {("lora_" in n, p.dtype) for n, p in model.named_parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    batch = task.collate([task.train_dataset()[i] for i in range(2)])
    x0, cond = task.encode_batch(batch, CPU)
    out = soar_loss(model, x0, cond, null_cond=task.null_cond(2, CPU), config=SOARConfig(num_aux=1, rollout_steps=4))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_two_process_ddp_lora_run_with_gradient_checkpointing(tmp_path, sd3_path, images):
    """`accelerate launch` with 2 CPU processes (gloo): DDP over the wrapped transformer works (no unused
    parameters, checkpoint + LoRA save from the main process)."""

    proc = launch_two_processes(
        "-m",
        "soarflow",
        "train",
        *tiny_train_args("sd3", tmp_path / "ddp", sd3_path, images, batch_size=1, checkpointing_steps=2),
        "--soar.num_aux",
        "2",
        "--soar.rollout_steps",
        "4",
        "--gradient_checkpointing",
        "--model.finetune=lora",
        timeout=300,
    )
    assert "2 process(es)" in proc.stdout + proc.stderr
    assert (tmp_path / "ddp" / "model" / LORA_WEIGHTS).is_file() and (tmp_path / "ddp" / "checkpoint-2").is_dir()
