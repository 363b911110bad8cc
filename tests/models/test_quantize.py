"""LoRA on a quantized frozen base (model.quantize_base) on the tiny SD3 pipeline, for the backends that quantize on
a CPU: the loss is finite, only the adapters get gradients, and the adapter a run saves loads onto an unquantized
diffusers pipeline and changes its output."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers_testing import generate_tiny, tiny_train_args  # noqa: E402
from soarflow.models.quantize import QuantizeSection, is_quantized  # noqa: E402
from soarflow.objective import SOARConfig, sft_loss  # noqa: E402
from soarflow.tasks.sd3 import SD3Task  # noqa: E402
from soarflow.train import load_config, train  # noqa: E402

CPU = torch.device("cpu")
BACKENDS = [
    ("quanto", "int8", "optimum.quanto"),
    ("quanto", "float8", "optimum.quanto"),
    ("torchao", "int8", "torchao"),
]


def _task(sd3_path, images, backend, weights):
    return SD3Task.from_config(
        {
            "pretrained": str(sd3_path),
            "max_sequence_length": 8,
            "finetune": "lora",
            "lora": {"rank": 4},
            "quantize_base": {"backend": backend, "weights": weights},
        },
        {"path": str(images), "resolution": 32},
    )


def _frozen_linear_weights_are_quantized(model) -> bool:
    """The base projections hold quantized tensors (quanto QLinear / a torchao tensor subclass), not plain floats."""
    attn = model.transformer.transformer_blocks[0].attn.to_q.base_layer
    return type(attn).__name__ == "QLinear" or type(attn.weight).__name__ not in ("Parameter", "Tensor")


@pytest.mark.parametrize("backend,weights,module", BACKENDS)
def test_lora_on_a_quantized_base_trains_only_the_adapters(sd3_path, images, backend, weights, module):
    pytest.importorskip(module)
    task = _task(sd3_path, images, backend, weights)
    model = task.build_model()
    assert is_quantized(model.transformer) and _frozen_linear_weights_are_quantized(model)
    batch = task.collate([task.train_dataset()[i] for i in range(2)])
    x0, cond = task.encode_batch(batch, CPU)
    out = sft_loss(model, x0, cond, config=SOARConfig(), null_cond=task.null_cond(2, CPU))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad and with_grad <= trainable and all("lora_" in n for n in trainable)
    assert any(float(model.get_parameter(n).grad.abs().sum()) > 0 for n in with_grad)


def test_quantize_base_config_errors():
    with pytest.raises(ValueError, match="weights': backend quanto takes"):
        QuantizeSection(backend="quanto", weights="nf4")
    with pytest.raises(ValueError, match="only a LoRA run"):
        SD3Task.from_config({"pretrained": "x", "quantize_base": {"backend": "quanto"}}, {"path": "y"})
    if not torch.cuda.is_available():
        from soarflow.models.quantize import quantization_config

        with pytest.raises(ValueError, match="bitsandbytes quantizes only on a CUDA GPU"):
            quantization_config(QuantizeSection(backend="bitsandbytes", weights="nf4"))


def test_adapter_trained_on_a_quantized_base_loads_onto_the_unquantized_pipeline(tmp_path, sd3_path, images):
    pytest.importorskip("optimum.quanto")
    from diffusers import StableDiffusion3Pipeline

    config = load_config(
        None,
        [
            *tiny_train_args(
                "sd3", tmp_path / "run", sd3_path, images, method="sft", checkpointing_steps=0, learning_rate="1e-2"
            ),
            "--model.finetune=lora",
            "--model.lora={rank: 4}",
            "--model.quantize_base={backend: quanto, weights: int8}",
        ],
    )
    result = train(config)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)

    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_path))
    assert not is_quantized(pipe.transformer)
    before = generate_tiny(pipe, "a red circle", output_type="latent", generator=torch.Generator().manual_seed(0))
    pipe.load_lora_weights(str(result.model_path))
    after = generate_tiny(pipe, "a red circle", output_type="latent", generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(after).all()
    assert (after - before).abs().max() > 1e-4  # the adapter is applied


GPU_BACKENDS = [
    ("bitsandbytes", "nf4", "bitsandbytes"),
    ("bitsandbytes", "int8", "bitsandbytes"),
    ("torchao", "float8", "torchao"),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="these backends quantize on a CUDA GPU only")
@pytest.mark.parametrize("backend,weights,module", GPU_BACKENDS)
def test_gpu_backends_train_only_the_adapters(sd3_path, images, backend, weights, module):
    """The GPU script's check of the backends that cannot run here (bench/gpu_all.sh runs this file on CUDA)."""
    pytest.importorskip(module)
    cuda = torch.device("cuda")
    task = _task(sd3_path, images, backend, weights)
    model = task.build_model()
    if next(model.transformer.parameters()).device.type != "cuda":  # bitsandbytes loads onto the GPU itself
        model.to(cuda)
    for p in model.parameters():
        if p.requires_grad and p.device.type != "cuda":
            p.data = p.data.to(cuda)
    assert is_quantized(model.transformer) and _frozen_linear_weights_are_quantized(model)
    batch = task.collate([task.train_dataset()[i] for i in range(2)])
    x0, cond = task.encode_batch(batch, cuda)
    out = sft_loss(model, x0, cond, config=SOARConfig(), null_cond=task.null_cond(2, cuda))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
