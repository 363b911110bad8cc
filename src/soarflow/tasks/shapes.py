"""The embedded default task: the small U-Net (or MMDiT) on the ShapesEval world (no download, no GPU).

The helpers everything else uses to run that model live below the tasks: `load_shapes_model` and
`base_checkpoint_path` in :mod:`soarflow.models.embedded`, `generate_images` (captions -> images with the Euler
sampler and guidance) in :mod:`soarflow.shapes.generate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..models.embedded import (
    ARCHITECTURES,
    build_model,
    load_shapes_model,
    load_state,
    read_checkpoint,
    save_checkpoint,
)
from ..shapes.generate import GUIDANCE_SCALE, encode_captions, generate_images, null_caption
from ..shapes.corruption import Corruption
from ..shapes.datasets import ShapesDataset, check_family_weights
from ..shapes.grammar import MAX_TOKENS, VOCAB
from ..utils.config_parsing import from_dict
from .base import Task


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

    FORMER_KEYS: ClassVar[dict[str, str]] = {"validation_cfg": "validation_guidance_scale"}

    split: str = "curated"  # "curated" (post-training) or "pretrain" (the noisy web-like corpus)
    num_samples: int | None = None  # None: the split's default size
    seed: int = 0
    image_size: int = 32
    # split "pretrain" (and the replayed items of a curated split): per-item noise rates (clutter, wrong,
    # incomplete, generic, prefix); {} = the shipped corpus
    corruption: dict = field(default_factory=dict)
    # split "curated": relative weights of the families, e.g. {counting: 1, position: 1}; {} = uniform
    family_weights: dict = field(default_factory=dict)
    # split "curated": that fraction of items come from the pretraining corpus instead (replay); 0 = none
    replay_fraction: float = 0.0
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
    validation_guidance_scale: float = GUIDANCE_SCALE
    eval_prompts_per_family: int = 10  # ShapesEval size of manifest.json's score (write_manifest: true)


class ShapesTask(Task):
    """`Task` for the embedded model on ShapesEval (see `soarflow.tasks.base.Task`)."""

    guidance_scale = GUIDANCE_SCALE  # default classifier-free guidance scale (validation, generate_images)

    def __init__(self, model: ShapesModelSection | None = None, data: ShapesDataSection | None = None):
        self.model_config = model or ShapesModelSection()
        self.data_config = data or ShapesDataSection()
        if self.data_config.split not in ("curated", "pretrain"):
            raise ValueError(f"data.split must be 'curated' or 'pretrain', got {self.data_config.split!r}")
        self.corruption = from_dict(Corruption, dict(self.data_config.corruption), prefix="data.corruption")
        if self.data_config.family_weights and self.data_config.split != "curated":
            raise ValueError("data.family_weights applies to data.split 'curated' only")
        check_family_weights(dict(self.data_config.family_weights), name="data.family_weights")
        if not 0.0 <= self.data_config.replay_fraction <= 1.0:
            raise ValueError(f"data.replay_fraction must lie in [0, 1], got {self.data_config.replay_fraction}")
        if self.data_config.replay_fraction and self.data_config.split != "curated":
            raise ValueError("data.replay_fraction applies to data.split 'curated' only")

    @classmethod
    def from_config(cls, model: dict | None = None, data: dict | None = None, train_config: Any = None) -> "ShapesTask":
        arch = sorted(k for k in (model or {}) if k != "pretrained")
        if arch and (model or {}).get("pretrained", "base") is not None:  # a checkpoint fixes its architecture
            raise ValueError(
                f"config key 'model.{arch[0]}': architecture keys apply only to a model trained from "
                f"scratch (model.pretrained: null); model.pretrained="
                f"{(model or {}).get('pretrained', 'base')!r} fixes the architecture"
            )
        return cls(
            from_dict(ShapesModelSection, model or {}, prefix="model"),
            from_dict(ShapesDataSection, data or {}, prefix="data"),
        )

    # -- model -------------------------------------------------------------------------------------
    def architecture_config(self) -> dict:
        """The architecture config (as a dict for `embedded.build_model`) of a model trained from scratch."""
        m = self.model_config
        common = dict(
            image_size=self.data_config.image_size, num_heads=m.num_heads, vocab_size=len(VOCAB), max_tokens=MAX_TOKENS
        )
        if m.architecture == "unet":
            return dict(
                common,
                channels=list(m.channels),
                num_res_blocks=m.num_res_blocks,
                attention_levels=list(m.attention_levels),
                text_dim=m.text_dim,
                text_layers=m.text_layers,
            )
        if m.architecture == "mmdit":
            return dict(
                common, patch_size=m.patch_size, hidden_size=m.hidden_size, depth=m.depth, mlp_ratio=m.mlp_ratio
            )
        raise ValueError(
            f"config key 'model.architecture': unknown {m.architecture!r}; choose one of {', '.join(ARCHITECTURES)}"
        )

    def build_model(self) -> nn.Module:
        if self.model_config.pretrained is None:
            return build_model(self.model_config.architecture, self.architecture_config())
        model = load_shapes_model(self.model_config.pretrained)
        if model.config.image_size != self.data_config.image_size:
            raise ValueError(
                f"model.pretrained={self.model_config.pretrained!r} was trained at {model.config.image_size}px "
                f"but data.image_size={self.data_config.image_size}"
            )
        return model

    # -- data --------------------------------------------------------------------------------------
    def train_dataset(self) -> torch.utils.data.Dataset:
        d = self.data_config
        return ShapesDataset(
            split=d.split,
            num_samples=d.num_samples,
            seed=d.seed,
            image_size=d.image_size,
            corruption=self.corruption,
            family_weights=dict(d.family_weights) or None,
            replay_fraction=d.replay_fraction,
        )

    def collate(self, samples: Sequence[dict]) -> dict:
        return {"image": torch.stack([s["image"] for s in samples]), "caption": [s["caption"] for s in samples]}

    def encode_batch(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
        return batch["image"].to(device), encode_captions(batch["caption"], device)

    def null_cond(self, batch_size: int, device: torch.device) -> dict:
        return null_caption(batch_size, device)

    def validation_images(self, model: nn.Module, device: torch.device) -> tuple[torch.Tensor, list[str]]:
        prompts = list(self.data_config.validation_prompts)
        images = generate_images(
            model,
            prompts,
            num_steps=self.data_config.validation_steps,
            guidance_scale=self.data_config.validation_guidance_scale,
            device=device,
        )
        return images, prompts

    def manifest_evaluation(self, model: nn.Module) -> dict:
        """ShapesEval, FD and diversity of a trained model at the demo's sampler settings (40 Euler steps,
        guidance 4, 4 images per prompt), for manifest.json (the shipped base's: assets/base_shapes.json)."""
        from ..shapes import ShapesEval, score
        from ..shapes.metrics import diversity, frechet_distance

        bench = ShapesEval(prompts_per_family=self.data_config.eval_prompts_per_family, images_per_prompt=4, seed=0)
        prompts = bench.image_prompts()
        images = generate_images(model, prompts, num_steps=40, guidance_scale=GUIDANCE_SCALE, seed=0)
        report = score(images, prompts)
        groups = [i // bench.images_per_prompt for i in range(len(prompts))]
        return {
            "shapes_eval": {
                "num_steps": 40,
                "cfg_scale": 4.0,
                "prompt_seed": 0,
                "overall": report.overall,
                "per_family": report.per_family,
                "fd": frechet_distance(images, bench.render_real()),
                "diversity": diversity(images, groups),
            }
        }

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
