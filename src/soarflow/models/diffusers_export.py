r"""Other shapes of a trained diffusers transformer on disk: a save dtype, a single-file checkpoint and a LoRA in
ComfyUI's key format.

**save dtype.** :func:`save_transformer` writes ``config.json`` and ``diffusion_pytorch_model.safetensors`` (what
``from_pretrained`` reads) with every floating tensor cast to the chosen dtype (bf16 halves an fp32 full
fine-tune's size); integer tensors are kept.

**single file.** :func:`single_file_state_dict` gives the transformer's weights in the key layout of the original
(Stability) SD3 checkpoints, ``model.diffusion_model.joint_blocks.{i}...``, as the single ``.safetensors`` files
ComfyUI and diffusers' ``SD3Transformer2DModel.from_single_file`` read. It inverts diffusers' own
``convert_sd3_transformer_checkpoint_to_diffusers``: the q, k, v projections of each stream are concatenated
row-wise into ``qkv`` (:math:`W_{qkv} = [W_q; W_k; W_v]`), and the adaLN modulations diffusers stores as
(scale, shift) where the original has (shift, scale) — the last block's context modulation and the final layer's —
are swapped back (the swap is its own inverse). FLUX keeps diffusers' keys (diffusers' ``from_single_file``
loads a file whose keys equal the model's without converting it).

**ComfyUI LoRA.** :func:`lora_to_comfyui` renames a peft adapter ``{module}.lora_A.weight`` /
``{module}.lora_B.weight`` to ``lora_transformer_{module with '.' -> '_'}.lora_down.weight`` / ``.lora_up.weight``
plus ``.alpha`` (the key set ComfyUI maps onto SD3 and FLUX diffusers-layout modules, also written by OneTrainer).
The kohya convention applies the update :math:`\tfrac{\alpha}{r}\, W_{up} W_{down}` with r the rows of
``lora_down``, the same :math:`\tfrac{\alpha}{r} B A` as peft, so A and B are stored unscaled with peft's alpha.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
ORIGINAL_PREFIX = "model.diffusion_model."


def cast_floats(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of `state` with floating tensors in `dtype` (others unchanged)."""
    return {
        k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().to("cpu")).contiguous()
        for k, v in state.items()
    }


def save_transformer(transformer: nn.Module, folder: Path, save_dtype: str = "fp32") -> Path:
    """``from_pretrained``-loadable folder of `transformer` with its floating weights in `save_dtype`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if save_dtype == "fp32":
        transformer.save_pretrained(folder)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    transformer.save_config(folder)
    save_file(
        cast_floats(transformer.state_dict(), SAVE_DTYPES[save_dtype]),
        str(folder / WEIGHTS_NAME),
        metadata={"format": "pt"},
    )
    return folder


# ---------------------------------------------------------------------------------------------- single file


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def sd3_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers ``SD3Transformer2DModel`` keys -> the original SD3 / SD3.5 single-file keys (module docstring).
    Raises ValueError naming any weight it has no place for (a layout this mapping does not know)."""
    s = dict(state)
    out: dict[str, torch.Tensor] = {}

    def move(src: str, dst: str, fn=None) -> None:
        for suffix in (".weight", ".bias"):
            if src + suffix in s:
                t = s.pop(src + suffix)
                out[dst + suffix] = fn(t) if fn else t

    def fuse(srcs: list[str], dst: str) -> None:
        for suffix in (".weight", ".bias"):
            if srcs[0] + suffix in s:
                out[dst + suffix] = torch.cat([s.pop(x + suffix) for x in srcs], dim=0)

    out["pos_embed"] = s.pop("pos_embed.pos_embed")
    move("pos_embed.proj", "x_embedder.proj")
    move("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
    move("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
    move("context_embedder", "context_embedder")
    move("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")
    move("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2")
    blocks = sorted({int(k.split(".")[1]) for k in s if k.startswith("transformer_blocks.")})
    for i in blocks:
        d, o = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        last = i == blocks[-1]
        fuse([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], f"{o}.x_block.attn.qkv")
        fuse([f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], f"{o}.context_block.attn.qkv")
        move(f"{d}.attn.norm_q", f"{o}.x_block.attn.ln_q")
        move(f"{d}.attn.norm_k", f"{o}.x_block.attn.ln_k")
        move(f"{d}.attn.norm_added_q", f"{o}.context_block.attn.ln_q")
        move(f"{d}.attn.norm_added_k", f"{o}.context_block.attn.ln_k")
        move(f"{d}.attn.to_out.0", f"{o}.x_block.attn.proj")
        move(f"{d}.attn.to_add_out", f"{o}.context_block.attn.proj")
        fuse([f"{d}.attn2.to_q", f"{d}.attn2.to_k", f"{d}.attn2.to_v"], f"{o}.x_block.attn2.qkv")
        move(f"{d}.attn2.norm_q", f"{o}.x_block.attn2.ln_q")
        move(f"{d}.attn2.norm_k", f"{o}.x_block.attn2.ln_k")
        move(f"{d}.attn2.to_out.0", f"{o}.x_block.attn2.proj")
        move(f"{d}.norm1.linear", f"{o}.x_block.adaLN_modulation.1")
        move(f"{d}.norm1_context.linear", f"{o}.context_block.adaLN_modulation.1", _swap_halves if last else None)
        move(f"{d}.ff.net.0.proj", f"{o}.x_block.mlp.fc1")
        move(f"{d}.ff.net.2", f"{o}.x_block.mlp.fc2")
        move(f"{d}.ff_context.net.0.proj", f"{o}.context_block.mlp.fc1")
        move(f"{d}.ff_context.net.2", f"{o}.context_block.mlp.fc2")
    move("proj_out", "final_layer.linear")
    move("norm_out.linear", "final_layer.adaLN_modulation.1", _swap_halves)
    if s:
        raise ValueError(f"save_single_file: no single-file key for the SD3 weights {sorted(s)[:5]}")
    return {ORIGINAL_PREFIX + k: v for k, v in out.items()}


def single_file_state_dict(family: str, transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The transformer's weights in `family`'s single-file layout (sd3: original keys; flux: diffusers keys)."""
    state = {k: v for k, v in transformer.state_dict().items()}
    if family == "sd3":
        return sd3_to_original(state)
    if family == "flux":
        return state
    raise ValueError(f"save_single_file: no single-file layout for family {family!r}")


def save_single_file(family: str, transformer: nn.Module, path: Path, save_dtype: str = "fp32") -> Path:
    """One ``.safetensors`` of the transformer (:func:`single_file_state_dict`) in `save_dtype`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        cast_floats(single_file_state_dict(family, transformer), SAVE_DTYPES[save_dtype]),
        str(path),
        metadata={"format": "pt"},
    )
    return path


# ---------------------------------------------------------------------------------------------- ComfyUI LoRA

COMFY_PREFIX = "lora_transformer_"


def lora_to_comfyui(peft_state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft adapter weights (``{module}.lora_A.weight`` / ``.lora_B.weight``, module paths inside the transformer)
    -> ComfyUI / kohya keys (module docstring) with one ``.alpha`` scalar per module."""
    out: dict[str, torch.Tensor] = {}
    for key, value in peft_state.items():
        module, kind = _split_lora_key(key)
        name = COMFY_PREFIX + module.replace(".", "_")
        out[f"{name}.{'lora_down' if kind == 'A' else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=value.dtype)
    return out


def _split_lora_key(key: str) -> tuple[str, Literal["A", "B"]]:
    for kind in ("A", "B"):
        marker = f".lora_{kind}."
        if marker in key:
            return key.split(marker)[0], kind  # type: ignore[return-value]
    raise ValueError(f"save_comfyui_lora: {key!r} is not a LoRA A/B weight")


__all__ = [
    "SAVE_DTYPES",
    "cast_floats",
    "lora_to_comfyui",
    "save_single_file",
    "save_transformer",
    "sd3_to_original",
    "single_file_state_dict",
]
