"""The embedded default task: the small U-Net (or MMDiT) on the ShapesEval world (no download, no GPU).

Also the helpers everything else uses to run that model: `load_shapes_model` (a path or "base", the shipped
base checkpoint), `generate_images` (captions -> images with the Euler sampler and guidance) and
`base_checkpoint_path`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..sampling import sample_euler
from .embedded import ARCHITECTURES, build_model, load_checkpoint, load_state, read_checkpoint, save_checkpoint

BASE_CHECKPOINT = "base_shapes.safetensors"

# Sampler settings shared by validation grids, the demo and `eval-shapes --checkpoint` unless overridden.
DEFAULT_SHIFT = 1.0  # pixel-space 32x32: no resolution shift


def base_checkpoint_path() -> Path:
    """The shipped, pretrained base model (produced by `soarflow pretrain`, see its JSON manifest)."""
    return Path(str(resources.files("soarflow") / "assets" / BASE_CHECKPOINT))


def resolve_checkpoint(path_or_name: str | Path) -> Path:
    if str(path_or_name) == "base":
        return base_checkpoint_path()
    return Path(path_or_name)


def load_shapes_model(path_or_name: str | Path = "base") -> nn.Module:
    """An embedded model (U-Net or MMDiT) from a safetensors checkpoint path, or "base" for the shipped base."""
    return load_checkpoint(resolve_checkpoint(path_or_name))


def encode_captions(captions: Sequence[str], device: torch.device | str = "cpu", max_tokens: int | None = None) -> dict:
    from ..shapes.world import MAX_TOKENS, tokenize

    return {"tokens": tokenize(list(captions), max_len=max_tokens or MAX_TOKENS).to(device)}


def null_caption(batch_size: int, device: torch.device | str = "cpu", max_tokens: int | None = None) -> dict:
    from ..shapes.world import MAX_TOKENS

    return {"tokens": torch.zeros(batch_size, max_tokens or MAX_TOKENS, dtype=torch.long, device=device)}


@torch.no_grad()
def generate_images(
    model: nn.Module,
    prompts: Sequence[str],
    *,
    num_steps: int = 40,
    cfg_scale: float = 4.0,
    shift: float = DEFAULT_SHIFT,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sample one image per prompt, (B, 3, H, W) in [-1, 1]. Image i's noise depends only on (seed, i), so
    results do not change with batch_size and two models given the same seed start from the same noise."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    cfg = model.config  # UNetConfig or MMDiTConfig: image_size, in_channels, max_tokens
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            noise = torch.stack(
                [torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + start + j)) for j in range(len(chunk))]
            ).to(device)
            cond = encode_captions(chunk, device, cfg.max_tokens)
            x = sample_euler(
                model,
                noise,
                cond,
                null_cond=null_caption(len(chunk), device, cfg.max_tokens),
                num_steps=num_steps,
                cfg_scale=cfg_scale,
                shift=shift,
            )
            out.append(x.clamp(-1, 1).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, *shape)


@dataclass
class ShapesModelSection:
    """`model:` section of a config for task "shapes".

    The architecture fields are used only when ``pretrained`` is null (training from scratch)."""

    pretrained: str | None = "base"  # "base" (shipped), a .safetensors path, or null to train from scratch
    architecture: str = "unet"  # "unet" (the shipped base's) or "mmdit"
    # unet
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    num_res_blocks: int = 1
    attention_levels: list[int] = field(default_factory=lambda: [1, 2])
    text_dim: int = 128
    text_layers: int = 1
    # mmdit
    hidden_size: int = 96
    depth: int = 4
    patch_size: int = 4
    mlp_ratio: float = 3.0
    # both
    num_heads: int = 4


@dataclass
class ShapesDataSection:
    """`data:` section of a config for task "shapes"."""

    split: str = "curated"  # "curated" (post-training) or "pretrain" (the noisy web-like corpus)
    num_samples: int | None = None  # None: the split's default size
    seed: int = 0
    image_size: int = 32
    validation_prompts: list[str] = field(
        default_factory=lambda: [
            "a red circle",
            "a blue square and a green triangle",
            "three yellow circles",
            "a magenta triangle",
            "a red circle to the left of a blue square",
            "a green circle and a red square",
            "two cyan squares",
            "a white triangle above a yellow circle",
        ]
    )
    validation_steps: int = 20
    validation_cfg: float = 4.0
    eval_prompts_per_family: int = 10  # ShapesEval size of manifest.json's score (write_manifest: true)


class ShapesTask:
    """`Task` for the embedded model on ShapesEval (see `soarflow.train.task.Task`)."""

    def __init__(self, model: ShapesModelSection | None = None, data: ShapesDataSection | None = None):
        self.model_cfg = model or ShapesModelSection()
        self.data_cfg = data or ShapesDataSection()
        if self.data_cfg.split not in ("curated", "pretrain"):
            raise ValueError(f"data.split must be 'curated' or 'pretrain', got {self.data_cfg.split!r}")

    @classmethod
    def from_config(cls, model: dict | None = None, data: dict | None = None, train_config: Any = None) -> "ShapesTask":
        from ..train.config import from_dict

        arch = sorted(k for k in (model or {}) if k != "pretrained")
        if arch and (model or {}).get("pretrained", "base") is not None:  # a checkpoint fixes its architecture
            raise ValueError(f"config key 'model.{arch[0]}': architecture keys apply only to a model trained from "
                             f"scratch (model.pretrained: null); model.pretrained="
                             f"{(model or {}).get('pretrained', 'base')!r} fixes the architecture")
        return cls(from_dict(ShapesModelSection, model or {}, prefix="model"), from_dict(ShapesDataSection, data or {}, prefix="data"))

    # -- model -------------------------------------------------------------------------------------
    def model_config(self) -> dict:
        """The architecture config (as a dict for `embedded.build_model`) of a model trained from scratch."""
        from ..shapes.world import MAX_TOKENS, VOCAB

        m = self.model_cfg
        common = dict(image_size=self.data_cfg.image_size, num_heads=m.num_heads, vocab_size=len(VOCAB), max_tokens=MAX_TOKENS)
        if m.architecture == "unet":
            return dict(common, channels=list(m.channels), num_res_blocks=m.num_res_blocks,
                        attention_levels=list(m.attention_levels), text_dim=m.text_dim, text_layers=m.text_layers)
        if m.architecture == "mmdit":
            return dict(common, patch_size=m.patch_size, hidden_size=m.hidden_size, depth=m.depth, mlp_ratio=m.mlp_ratio)
        raise ValueError(f"config key 'model.architecture': unknown {m.architecture!r}; choose one of {', '.join(ARCHITECTURES)}")

    def build_model(self) -> nn.Module:
        if self.model_cfg.pretrained is None:
            return build_model(self.model_cfg.architecture, self.model_config())
        model = load_shapes_model(self.model_cfg.pretrained)
        if model.config.image_size != self.data_cfg.image_size:
            raise ValueError(
                f"model.pretrained={self.model_cfg.pretrained!r} was trained at {model.config.image_size}px "
                f"but data.image_size={self.data_cfg.image_size}"
            )
        return model

    # -- data --------------------------------------------------------------------------------------
    def train_dataset(self) -> torch.utils.data.Dataset:
        from ..shapes.world import ShapesDataset

        d = self.data_cfg
        return ShapesDataset(split=d.split, num_samples=d.num_samples, seed=d.seed, image_size=d.image_size)

    def collate(self, samples: Sequence[dict]) -> dict:
        return {"image": torch.stack([s["image"] for s in samples]), "caption": [s["caption"] for s in samples]}

    def encode_batch(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
        return batch["image"].to(device), encode_captions(batch["caption"], device)

    def null_cond(self, batch_size: int, device: torch.device) -> dict:
        return null_caption(batch_size, device)

    def validation_images(self, model: nn.Module, device: torch.device) -> tuple[torch.Tensor, list[str]]:
        prompts = list(self.data_cfg.validation_prompts)
        images = generate_images(
            model, prompts, num_steps=self.data_cfg.validation_steps, cfg_scale=self.data_cfg.validation_cfg, device=device
        )
        return images, prompts

    def manifest_evaluation(self, model: nn.Module) -> dict:
        """ShapesEval, FD and diversity of a trained model at the demo's sampler settings (40 Euler steps,
        guidance 4, 4 images per prompt), for manifest.json (the shipped base's: assets/base_shapes.json)."""
        from ..shapes import ShapesEval, score
        from ..shapes.metrics import diversity, frechet_distance

        bench = ShapesEval(prompts_per_family=self.data_cfg.eval_prompts_per_family, images_per_prompt=4, seed=0)
        prompts = bench.image_prompts()
        images = generate_images(model, prompts, num_steps=40, cfg_scale=4.0, seed=0)
        report = score(images, prompts)
        groups = [i // bench.images_per_prompt for i in range(len(prompts))]
        return {"shapes_eval": {
            "num_steps": 40, "cfg_scale": 4.0, "prompt_seed": 0, "overall": report.overall,
            "per_family": report.per_family, "fd": frechet_distance(images, bench.render_real()),
            "diversity": diversity(images, groups)}}

    # -- weights -----------------------------------------------------------------------------------
    def save_model(self, model: nn.Module, path: Path) -> None:
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        save_checkpoint(model, path)

    def load_model_weights(self, model: nn.Module, path: Path) -> None:
        path = Path(path)
        if not path.exists() and path.with_suffix(".safetensors").exists():
            path = path.with_suffix(".safetensors")
        _, _, state, _ = read_checkpoint(path)
        load_state(model, state, path)
