r"""A quantized frozen base for LoRA: the transformer loaded through one of diffusers' quantization configs.

``model.quantize_base: {backend: quanto, weights: int8}`` loads the diffusers transformer with
``from_pretrained(..., quantization_config=...)``; the frozen linear weights are then stored in 8 (or 4) bits and
dequantized on the fly in the forward pass, and the LoRA adapters (peft) sit on top of the quantized layers in
float32. The trained adapter is the usual diffusers LoRA file, so it loads onto an *unquantized* pipeline too: for
a frozen weight :math:`W` and its quantized form :math:`\hat W = Q(W)`, training fits
:math:`\hat W x + \tfrac{\alpha}{r} B A x`, and the adapter :math:`(A, B)` is applied to :math:`W` at inference
(the quantization error :math:`W - \hat W` is what QLoRA-style training accepts).

Backends and the weight formats each accepts (diffusers' config classes):

========================  ====================================  =================================================
backend                   weights                               runs on
========================  ====================================  =================================================
``quanto``                int8, float8, int4, int2              CPU and CUDA (optimum-quanto; CPU-tested: int8,
                                                                float8)
``torchao``               int8, float8, int4                    int8 weight-only: CPU-tested; float8 ran once on
                                                                the CPU; int4 needs torchao's extra kernels
``bitsandbytes``          int8, nf4, fp4                        CUDA only (diffusers refuses to quantize without
                                                                a GPU)
========================  ====================================  =================================================

Only LoRA can train on a quantized base (a full fine-tune would have to update the quantized weights themselves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

WEIGHTS = {
    "quanto": ("int8", "float8", "int4", "int2"),
    "torchao": ("int8", "float8", "int4"),
    "bitsandbytes": ("int8", "nf4", "fp4"),
}
PACKAGES = {"quanto": "optimum-quanto", "torchao": "torchao", "bitsandbytes": "bitsandbytes"}
# Where a backend was run through the LoRA tests on a CPU (tests/models/test_quantize.py); the others need CUDA.
CPU_TESTED = (("quanto", "int8"), ("quanto", "float8"), ("torchao", "int8"))


@dataclass
class QuantizeSection:
    """``model.quantize_base:`` — quantize the frozen transformer of a LoRA run (null: keep it unquantized)."""

    backend: Literal["quanto", "torchao", "bitsandbytes"] = "quanto"
    weights: str = "int8"

    def __post_init__(self) -> None:
        if self.backend not in WEIGHTS:
            raise ValueError(f"config key 'backend': must be one of {', '.join(WEIGHTS)} (got {self.backend!r})")
        if self.weights not in WEIGHTS[self.backend]:
            raise ValueError(
                f"config key 'weights': backend {self.backend} takes {', '.join(WEIGHTS[self.backend])} "
                f"(got {self.weights!r})"
            )


def _require(module: str, backend: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(
            f"config key 'model.quantize_base.backend': {backend} needs the package {PACKAGES[backend]} "
            f"(pip install {PACKAGES[backend]}), or remove model.quantize_base"
        ) from None


def check_device(section: QuantizeSection) -> None:
    """Refuse a backend that cannot quantize on this machine, before any weights load."""
    if section.backend == "bitsandbytes" and not torch.cuda.is_available():
        raise ValueError(
            "config key 'model.quantize_base.backend': bitsandbytes quantizes only on a CUDA GPU "
            "(none found); on the CPU use backend quanto (int8, float8) or torchao (int8)"
        )


def quantization_config(section: QuantizeSection, compute_dtype: torch.dtype = torch.float32) -> Any:
    """The diffusers quantization config for `section` (``from_pretrained(..., quantization_config=...)``).

    `compute_dtype` is the dtype the dequantized weights are used in (bitsandbytes 4-bit's compute dtype)."""
    import diffusers

    check_device(section)
    if section.backend == "quanto":
        _require("optimum.quanto", "quanto")
        return diffusers.QuantoConfig(weights_dtype=section.weights)
    if section.backend == "torchao":
        quant = _require("torchao.quantization", "torchao")
        make = {"int8": "Int8WeightOnlyConfig", "float8": "Float8WeightOnlyConfig", "int4": "Int4WeightOnlyConfig"}
        return diffusers.TorchAoConfig(getattr(quant, make[section.weights])())
    _require("bitsandbytes", "bitsandbytes")
    if section.weights == "int8":
        return diffusers.BitsAndBytesConfig(load_in_8bit=True)
    return diffusers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=section.weights, bnb_4bit_compute_dtype=compute_dtype
    )


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether diffusers loaded `module` through a quantization config."""
    return bool(getattr(module, "is_quantized", False) or getattr(module, "hf_quantizer", None) is not None)


__all__ = ["CPU_TESTED", "QuantizeSection", "WEIGHTS", "check_device", "is_quantized", "quantization_config"]
