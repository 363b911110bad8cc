"""Exports of the diffusers tasks on tiny pipelines: save_dtype, the single-file SD3 transformer (read back by
diffusers' from_single_file), LoRA in ComfyUI's keys (FLUX: converted back by diffusers' own kohya converter; SD3:
by ComfyUI's key rule, as diffusers ships no SD3 converter), and mid-run checkpoints that diffusers loads."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import (  # noqa: E402
    FluxPipeline,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from safetensors import safe_open  # noqa: E402

from diffusers_testing import (  # noqa: E402
    build_tiny_flux_pipeline,
    build_tiny_sd3_pipeline,
    generate_tiny,
    tiny_train_args,
)
from soarflow.models.diffusers_export import lora_to_comfyui, sd3_to_original  # noqa: E402
from soarflow.models.diffusers_weights import COMFYUI_LORA  # noqa: E402
from soarflow.models.lora import LORA_WEIGHTS  # noqa: E402
from soarflow.tasks.flux import FluxTask  # noqa: E402
from soarflow.train import load_config, train  # noqa: E402


@pytest.fixture(scope="module")
def sd35_path(tmp_path_factory):
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd35x") / "pipe", variant="sd35")


def _run(tmp_path, name, path, images, *extra):
    return train(
        load_config(
            None,
            [
                *tiny_train_args("sd3", tmp_path / name, path, images, method="sft", learning_rate="1e-2"),
                *extra,
            ],
        )
    )


def _dtypes(file):
    with safe_open(str(file), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def _latents(pipe, **kw):
    return generate_tiny(pipe, "a red circle", output_type="latent", generator=torch.Generator().manual_seed(0), **kw)


def test_full_finetune_bf16_single_file_and_every_checkpoint_load_in_diffusers(tmp_path, sd35_path, images):
    result = _run(
        tmp_path,
        "full",
        sd35_path,
        images,
        "--model.finetune=full",
        "--model.save_dtype=bf16",
        "--model.save_single_file=true",
        "--use_ema",
        "--ema_decay",
        "0.5",
    )
    model_dir = result.model_path
    # save_dtype: the diffusers folder holds bf16 weights, equal to the trained (EMA) weights rounded to bf16
    assert _dtypes(model_dir / "transformer" / "diffusion_pytorch_model.safetensors") == {"BF16"}
    assert json.loads((model_dir / "soarflow_model.json").read_text())["save_dtype"] == "bf16"
    folder = SD3Transformer2DModel.from_pretrained(str(model_dir / "transformer"))
    trained = result.model.transformer.state_dict()
    for k, v in folder.state_dict().items():
        assert torch.equal(v.float(), trained[k].to(torch.bfloat16).float()), k

    # single file: original SD3 keys, which diffusers' from_single_file converts back to the same transformer
    single = model_dir / "sd3_transformer.safetensors"
    with safe_open(str(single), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in keys
    assert "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in keys  # SD3.5's dual attention
    assert not any(".to_q." in k for k in keys)
    loaded = SD3Transformer2DModel.from_single_file(str(single), config=str(sd35_path), subfolder="transformer")
    for k, v in folder.state_dict().items():
        assert torch.equal(loaded.state_dict()[k].float(), v.float()), k

    # a mid-run checkpoint holds a model folder diffusers loads, with that step's (EMA) weights, not the final ones
    ckpt_model = tmp_path / "full" / "checkpoint-1" / "model"
    mid = SD3Transformer2DModel.from_pretrained(str(ckpt_model / "transformer"))
    assert any(not torch.equal(mid.state_dict()[k], folder.state_dict()[k]) for k in trained)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd35_path), transformer=mid)
    assert torch.isfinite(_latents(pipe)).all()


def test_sd3_mapping_refuses_unknown_weights():
    with pytest.raises(ValueError, match="no single-file key"):
        sd3_to_original({"pos_embed.pos_embed": torch.zeros(1), "mystery.weight": torch.zeros(1)})


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _comfy_to_diffusers_by_comfyui_rule(comfy: dict, transformer) -> dict:
    """ComfyUI's loader for SD3 maps 'lora_transformer_' + module path with '.' -> '_' to each diffusers module,
    and applies alpha / rank * up @ down (rank = rows of lora_down); written out here as a diffusers LoRA."""
    names = {
        "lora_transformer_" + n.replace(".", "_"): n
        for n, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    out = {}
    for key in {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in comfy}:
        assert key in names, key
        down, up = comfy[f"{key}.lora_down.weight"], comfy[f"{key}.lora_up.weight"]
        scale = float(comfy[f"{key}.alpha"]) / down.shape[0]
        out[f"transformer.{names[key]}.lora_A.weight"] = down * scale
        out[f"transformer.{names[key]}.lora_B.weight"] = up
    return out


def test_comfyui_lora_sd3_and_a_mid_run_lora_checkpoint(tmp_path, sd35_path, images):
    result = _run(
        tmp_path,
        "lora",
        sd35_path,
        images,
        "--model.finetune=lora",
        "--model.lora={rank: 4, alpha: 8}",
        "--model.save_comfyui_lora=true",
    )
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd35_path))
    base = _latents(pipe)
    pipe.load_lora_weights(str(tmp_path / "lora" / "checkpoint-1" / "model"))  # a mid-run checkpoint
    mid = _latents(pipe)
    assert (mid - base).abs().max() > 1e-5
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(result.model_path))  # picks pytorch_lora_weights.safetensors beside the ComfyUI file
    reference = _latents(pipe)
    pipe.unload_lora_weights()

    from safetensors.torch import load_file

    comfy = load_file(str(result.model_path / COMFYUI_LORA))
    assert comfy and all(k.startswith("lora_transformer_") for k in comfy)
    assert {float(v) for k, v in comfy.items() if k.endswith(".alpha")} == {8.0}
    pipe.load_lora_weights(_comfy_to_diffusers_by_comfyui_rule(comfy, pipe.transformer))
    torch.testing.assert_close(_latents(pipe), reference, rtol=1e-4, atol=1e-5)
    assert (reference - mid).abs().max() > 1e-6  # the final adapter differs from the mid-run one


def test_comfyui_lora_flux_converts_back_with_diffusers_kohya_converter(tmp_path, images):
    path = build_tiny_flux_pipeline(tmp_path / "flux")
    task = FluxTask.from_config(
        {
            "pretrained": str(path),
            "max_sequence_length": 8,
            "finetune": "lora",
            "lora": {"rank": 4, "alpha": 2},
            "guidance": "embedded",
            "save_comfyui_lora": True,
        },
        {"path": str(images), "resolution": 32},
    )
    model = task.build_model()
    _randomize_lora(model)
    saved = task.save_model(model, tmp_path / "model")
    from safetensors.torch import load_file

    comfy = load_file(str(saved / COMFYUI_LORA))
    assert any(k.startswith("lora_transformer_single_transformer_blocks_0_attn_to_q") for k in comfy)

    pipe = FluxPipeline.from_pretrained(str(path))
    base = _latents(pipe, guidance_scale=3.5)
    pipe.load_lora_weights(str(saved), weight_name=LORA_WEIGHTS)
    reference = _latents(pipe, guidance_scale=3.5)
    pipe.unload_lora_weights()
    # diffusers' FLUX loader recognises the kohya keys and converts them (scale alpha / rank folded into A, B)
    converted = FluxPipeline.lora_state_dict(str(saved / COMFYUI_LORA))
    converted = converted[0] if isinstance(converted, tuple) else converted
    assert len(converted) == sum(k.endswith(".weight") for k in comfy)
    pipe.load_lora_weights(str(saved), weight_name=COMFYUI_LORA)
    again = _latents(pipe, guidance_scale=3.5)
    assert (reference - base).abs().max() > 1e-4
    torch.testing.assert_close(again, reference, rtol=1e-4, atol=1e-5)


def test_lora_to_comfyui_keys_and_alpha():
    a, b = torch.randn(4, 16), torch.randn(16, 4)
    out = lora_to_comfyui(
        {"transformer_blocks.0.attn.to_out.0.lora_A.weight": a, "transformer_blocks.0.attn.to_out.0.lora_B.weight": b},
        alpha=8,
    )
    name = "lora_transformer_transformer_blocks_0_attn_to_out_0"
    assert set(out) == {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    assert torch.equal(out[f"{name}.lora_down.weight"], a) and torch.equal(out[f"{name}.lora_up.weight"], b)
    assert float(out[f"{name}.alpha"]) == 8.0
