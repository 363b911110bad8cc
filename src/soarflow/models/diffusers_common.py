r"""What the SD3 and FLUX adapters share: config sections, frozen encoders, data, caching, validation, saving.

A :class:`DiffusersTask` implements the trainer's `Task` protocol for one diffusers pipeline family. The
trainable model is a small `nn.Module` holding the family's transformer and exposing the velocity interface
``model(x, sigma, cond)`` (x: VAE latents (B, C, h, w); sigma (B,) in [0, 1]; cond: a dict of batch-first
tensors). The frozen parts — VAE and text encoders, loaded from the same folder with the pipeline class's
``from_pretrained(path, transformer=None)`` — stay in the task, so only the transformer is prepared by
accelerate, checkpointed and saved.

Latents follow the pipelines: :math:`x_0 = (\mathrm{VAE}(img) - \text{shift}) \cdot \text{scale}` with the
VAE's ``shift_factor``/``scaling_factor``; decoding inverts it. The null condition is the encoding of the
empty prompt, as the pipelines' classifier-free guidance uses for an empty negative prompt.

Saved model folder (``task.save_model``): ``transformer/`` (``save_pretrained``) for full fine-tuning, or
``pytorch_lora_weights.safetensors`` for LoRA, plus ``soarflow_model.json`` naming the base model, so that
``soarflow sample`` (or ``Pipeline.from_pretrained(base, transformer=...)`` / ``pipe.load_lora_weights``)
rebuilds a pipeline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import torch
from torch import nn

from ..conditioning import cond_repeat, cond_to
from ..data import (
    BadSampleLog,
    EncodingCache,
    ImageCaptionDataset,
    bucketed_batches,
    collate_images,
    read_imagefolder,
    read_soar_jsonl,
)
from ..objective import SOARConfig
from ..sampling import sample_euler
from .lora import LoraSection, add_lora, has_lora, load_lora, save_lora

logger = logging.getLogger(__name__)

MANIFEST = "soarflow_model.json"
NULL_ENTRY = "__empty_prompt__"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DiffusersModelSection:
    """``model:`` for tasks sd3 and flux."""

    pretrained: str = ""  # local diffusers pipeline folder or hub id (from_pretrained)
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" weight files
    finetune: Literal["full", "lora"] = "full"
    lora: LoraSection = field(default_factory=LoraSection)
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # VAE, text encoders; LoRA base weights
    max_sequence_length: int = 256  # T5 tokens
    offload_frozen: bool = False  # keep VAE/text encoders on the CPU between uses (saves ~11 GB with T5-XXL)
    # FLUX only (ignored by sd3): how guidance works in rollouts and validation
    guidance: Literal["cfg", "embedded"] = "cfg"
    embedded_guidance_scale: float = 3.5

    def __post_init__(self) -> None:
        if not self.pretrained:
            raise ValueError("config key 'pretrained': required — a diffusers pipeline folder or hub id")
        if self.finetune not in ("full", "lora"):
            raise ValueError(f"config key 'finetune': must be full or lora (got {self.finetune!r})")
        if self.frozen_dtype not in DTYPES:
            raise ValueError(f"config key 'frozen_dtype': must be one of {', '.join(DTYPES)}")
        if self.max_sequence_length < 1:
            raise ValueError(f"config key 'max_sequence_length': must be >= 1 (got {self.max_sequence_length})")
        if self.guidance not in ("cfg", "embedded"):
            raise ValueError(f"config key 'guidance': must be cfg or embedded (got {self.guidance!r})")


@dataclass
class DiffusersDataSection:
    """``data:`` for tasks sd3 and flux."""

    FORMER_KEYS: ClassVar[dict[str, str]] = {"validation_cfg": "validation_guidance_scale"}

    format: Literal["imagefolder", "soar_jsonl"] = "imagefolder"
    path: str = ""  # imagefolder: the folder with metadata.jsonl; soar_jsonl: the JSONL file
    image_dir: str | None = None  # soar_jsonl: folder of {md5}.jpg
    caption_column: str = "text"  # imagefolder caption field
    resolution: int = 512
    bucketing: bool = False  # aspect-ratio buckets of ~resolution^2 pixels
    bucket_divisor: int = 64
    max_aspect_ratio: float = 2.0
    random_flip: bool = False
    on_bad_sample: Literal["skip", "fail"] = "skip"
    max_samples: int | None = None  # use only the first N records
    cache_dir: str | None = None  # cache VAE latents + text embeddings here (safetensors shards)
    cache_shard_size: int = 256
    validation_prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a red apple on a table"])
    validation_num_steps: int = 28
    validation_guidance_scale: float | None = None  # None: the task's guidance_scale
    validation_seed: int = 0
    validation_resolution: int | None = None  # None: resolution

    def __post_init__(self) -> None:
        if self.format not in ("imagefolder", "soar_jsonl"):
            raise ValueError(f"config key 'format': must be imagefolder or soar_jsonl (got {self.format!r})")
        if not self.path:
            raise ValueError("config key 'path': required — the image folder (imagefolder) or JSONL file (soar_jsonl)")
        if self.format == "soar_jsonl" and not self.image_dir:
            raise ValueError("config key 'image_dir': required for format soar_jsonl (folder of {md5}.jpg)")
        if self.resolution < 8:
            raise ValueError(f"config key 'resolution': must be >= 8 (got {self.resolution})")
        if self.on_bad_sample not in ("skip", "fail"):
            raise ValueError(f"config key 'on_bad_sample': must be skip or fail (got {self.on_bad_sample!r})")
        if self.cache_dir and self.random_flip:
            raise ValueError("config key 'cache_dir': the cache stores one latent per image, so it cannot be combined "
                             "with random_flip; disable one of them")
        if self.validation_num_steps < 1:
            raise ValueError(f"config key 'validation_num_steps': must be >= 1 (got {self.validation_num_steps})")


# The default classifier-free guidance scale of the diffusers tasks (SD3.5's; FLUX with model.guidance: cfg).
GUIDANCE_SCALE = 4.5


def parse_sections(model: dict | None, data: dict | None, model_cls=DiffusersModelSection, data_cls=DiffusersDataSection):
    from ..train.config import from_dict

    return from_dict(model_cls, model or {}, prefix="model"), from_dict(data_cls, data or {}, prefix="data")


class VelocityModule(nn.Module):
    """Base of the velocity wrappers: holds ``self.transformer``; forwards gradient checkpointing to it."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype the transformer's (frozen or trainable) base weights are stored in; inputs are cast to it."""
        for name, p in self.transformer.named_parameters():
            if "lora_" not in name:
                return p.dtype
        return torch.float32


class DiffusersTask:
    """Shared `Task` implementation; subclasses set the classes and the family-specific encoding."""

    family = ""
    pipeline_class_name = ""
    transformer_class_name = ""
    default_max_sequence_length = 256

    def __init__(self, model: DiffusersModelSection, data: DiffusersDataSection, train_config: Any = None):
        self.model_config = model
        self.data_config = data
        self.train_config = train_config
        self.bad_samples = BadSampleLog(data.on_bad_sample)
        self._frozen = None  # the pipeline without transformer (VAE + text encoders), loaded lazily
        self._null: dict[torch.device, Any] = {}
        self._cache: EncodingCache | None = None

    @classmethod
    def from_config(cls, model: dict | None, data: dict | None, train_config: Any = None):
        model_dict = dict(model or {})
        model_dict.setdefault("max_sequence_length", cls.default_max_sequence_length)
        m, d = parse_sections(model_dict, data)
        task = cls(m, d, train_config)
        task.check_config()
        return task

    def check_config(self) -> None:
        """Family-specific checks of the combined config (override)."""

    # -- diffusers classes -------------------------------------------------------------------------------
    @property
    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    @property
    def transformer_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.transformer_class_name)

    def _load_kwargs(self) -> dict:
        kw = {}
        if self.model_config.revision:
            kw["revision"] = self.model_config.revision
        if self.model_config.variant:
            kw["variant"] = self.model_config.variant
        return kw

    def _check_pretrained(self) -> None:
        p = Path(self.model_config.pretrained)
        looks_local = p.is_absolute() or self.model_config.pretrained.startswith(".") or p.exists()
        if looks_local and not (p / "model_index.json").is_file():
            raise FileNotFoundError(f"model.pretrained: {p} is not a diffusers pipeline folder (no model_index.json)")

    # -- frozen parts ------------------------------------------------------------------------------------
    @property
    def frozen_dtype(self) -> torch.dtype:
        return DTYPES[self.model_config.frozen_dtype]

    def frozen(self, device: torch.device | str | None = None):
        """The pipeline without its transformer (VAE + tokenizers + text encoders), frozen, on `device`."""
        if self._frozen is None:
            self._check_pretrained()
            with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; keep both working
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                pipe = self.pipeline_class.from_pretrained(
                    self.model_config.pretrained, transformer=None, torch_dtype=self.frozen_dtype, **self._load_kwargs()
                )
            for name, component in pipe.components.items():
                if isinstance(component, nn.Module):
                    component.requires_grad_(False)
                    component.eval()
            pipe.set_progress_bar_config(disable=True)
            self._frozen = pipe
        if device is not None and self._frozen.device != torch.device(device):
            self._frozen.to(device)
        return self._frozen

    def vae_factors(self) -> tuple[float, float]:
        """(shift_factor, scaling_factor) of the VAE, read from its config (no weights are loaded)."""
        if not hasattr(self, "_vae_factors"):
            if self._frozen is not None:
                vae_config = dict(self._frozen.vae.config)
            else:
                from diffusers import AutoencoderKL

                vae_config = AutoencoderKL.load_config(self.model_config.pretrained, subfolder="vae", **self._load_kwargs())
            self._vae_factors = (float(vae_config.get("shift_factor") or 0.0), float(vae_config["scaling_factor"]))
        return self._vae_factors

    # -- model -------------------------------------------------------------------------------------------
    def load_transformer(self) -> nn.Module:
        self._check_pretrained()
        return self.transformer_class.from_pretrained(self.model_config.pretrained, subfolder="transformer",
                                                      **self._load_kwargs())

    def wrap(self, transformer: nn.Module) -> VelocityModule:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        transformer = self.load_transformer()
        if self.model_config.finetune == "lora":
            if self.frozen_dtype != torch.float32:
                transformer.to(self.frozen_dtype)
            add_lora(transformer, self.model_config.lora)
            for name, p in transformer.named_parameters():  # adapters train in float32 (mixed precision autocasts)
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            transformer.requires_grad_(True)
        return self.wrap(transformer)

    def enable_gradient_checkpointing(self, model: nn.Module) -> None:
        model.enable_gradient_checkpointing()

    # -- data --------------------------------------------------------------------------------------------
    def records(self):
        d = self.data_config
        if d.format == "imagefolder":
            recs = read_imagefolder(d.path, self.bad_samples, caption_column=d.caption_column)
        else:
            recs = read_soar_jsonl(d.path, d.image_dir, self.bad_samples)
        if d.max_samples is not None:
            recs = recs[: d.max_samples]
        logger.info("%s: %d samples, %s", d.path, len(recs), self.bad_samples.summary())
        return recs

    def train_dataset(self) -> ImageCaptionDataset:
        d = self.data_config
        return ImageCaptionDataset(
            self.records(), d.resolution, bucketing=d.bucketing, bucket_divisor=d.bucket_divisor,
            max_aspect_ratio=d.max_aspect_ratio, random_flip=d.random_flip, bad_samples=self.bad_samples,
        )

    def batch_indices(self, dataset: ImageCaptionDataset, global_batch: int, seed: int, epoch: int) -> list[list[int]] | None:
        """With ``data.bucketing``: the epoch's global batches, each drawn from one aspect bucket (seeded by
        seed and epoch); None without bucketing (plain random batches). For a trainer that supports it; otherwise
        `collate` brings mixed batches to their most common bucket."""
        if not self.data_config.bucketing:
            return None
        return bucketed_batches([dataset.bucket_of(i) for i in range(len(dataset))], global_batch, seed, epoch)

    def collate(self, samples: Sequence[dict]) -> dict:
        return collate_images(samples)

    def data_summary(self) -> str:
        """One line for the run summary: how many bad samples were skipped (and which)."""
        return self.bad_samples.summary()

    # -- encoding ----------------------------------------------------------------------------------------
    def encode_text(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Family-specific: the condition dict for `prompts` (float32 tensors on `device`)."""
        raise NotImplementedError

    def cache_spec(self) -> dict:
        """Everything the cached encodings depend on (its hash names the cache folder). Component configs are
        read from the files, so checking the cache loads no encoder weights."""
        spec = {
            "family": self.family,
            "pretrained": str(Path(self.model_config.pretrained).resolve()) if Path(self.model_config.pretrained).exists()
            else self.model_config.pretrained,
            "revision": self.model_config.revision,
            "variant": self.model_config.variant,
            "frozen_dtype": self.model_config.frozen_dtype,
            "max_sequence_length": self.model_config.max_sequence_length,
            "resolution": self.data_config.resolution,
            "bucketing": [self.data_config.bucketing, self.data_config.bucket_divisor, self.data_config.max_aspect_ratio],
            "data": [self.data_config.format, self.data_config.path, self.data_config.caption_column],
        }
        root = Path(self.model_config.pretrained)
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
            for file in ("config.json", "tokenizer_config.json"):
                if (root / name / file).is_file():
                    spec[f"{name}/{file}"] = json.loads((root / name / file).read_text())
        return spec

    def cache(self) -> EncodingCache | None:
        if self.data_config.cache_dir is None:
            return None
        if self._cache is None:
            rank = 0
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank = torch.distributed.get_rank()
            self._cache = EncodingCache(self.data_config.cache_dir, self.cache_spec(), self.data_config.cache_shard_size, rank)
        return self._cache

    @contextlib.contextmanager
    def frozen_on(self, device: torch.device):
        """The frozen pipeline on `device`; with ``model.offload_frozen`` it goes back to the CPU afterwards."""
        pipe = self.frozen(device)
        try:
            yield pipe
        finally:
            if self.model_config.offload_frozen and torch.device(device).type != "cpu":
                pipe.to("cpu")

    @torch.no_grad()
    def _encode_fresh(self, pixels: torch.Tensor, captions: list[str], device: torch.device) -> list[dict]:
        """Per sample: VAE posterior (mean, std) and the text condition, on the CPU for caching."""
        with self.frozen_on(device) as pipe:
            vae = pipe.vae
            dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
            text = self.encode_text(captions, device)
        out = []
        for i in range(pixels.shape[0]):
            entry = {"latent_mean": dist.mean[i].float(), "latent_std": dist.std[i].float()}
            entry.update({f"cond.{k}": v[i].float() for k, v in text.items()})
            out.append(entry)
        return out

    @torch.no_grad()
    def encode_batch(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
        r"""``(x0, cond)``: latents :math:`(z - \text{shift})\cdot\text{scale}` with z drawn from the VAE posterior,
        and the text condition. With ``data.cache_dir`` the posterior and condition are read from the cache when
        present and written to it otherwise."""
        cache = self.cache()
        pixels, captions = batch["pixel_values"], list(batch["caption"])
        h, w = pixels.shape[-2:]
        names = [f"{key}@{h}x{w}".replace("/", "|") for key in batch["key"]]
        entries: list[dict | None] = [cache.get(n) if cache is not None else None for n in names]
        missing = [i for i, e in enumerate(entries) if e is None]
        if missing:
            fresh = self._encode_fresh(pixels[missing], [captions[i] for i in missing], device)
            for i, e in zip(missing, fresh):
                entries[i] = e
                if cache is not None:
                    cache.put(names[i], e)
        mean = torch.stack([e["latent_mean"].to(device) for e in entries])
        std = torch.stack([e["latent_std"].to(device) for e in entries])
        shift, scale = self.vae_factors()
        x0 = (mean + std * torch.randn_like(mean) - shift) * scale
        keys = [k for k in entries[0] if k.startswith("cond.")]
        cond = {k[5:]: torch.stack([e[k].to(device) for e in entries]) for k in keys}
        return x0, self.finish_cond(cond)

    def finish_cond(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hook to add non-text entries to a condition (FLUX: the embedded guidance)."""
        return cond

    def null_cond(self, batch_size: int, device: torch.device) -> dict:
        """The empty prompt's condition (read from the encoding cache when there is one)."""
        device = torch.device(device)
        if device not in self._null:
            cache = self.cache()
            entry = cache.get(NULL_ENTRY) if cache is not None else None
            if entry is None:
                with torch.no_grad(), self.frozen_on(device):
                    entry = {k: v[0].float() for k, v in self.encode_text([""], device).items()}
                if cache is not None:
                    cache.put(NULL_ENTRY, entry)
            self._null[device] = self.finish_cond({k: v[None].to(device) for k, v in entry.items()})
        return cond_repeat(self._null[device], batch_size)

    # -- validation --------------------------------------------------------------------------------------
    @property
    def sample_shift(self) -> float:
        """The objective's time shift ``soar.shift`` (SOARConfig's default without a trainer config)."""
        return float((self.train_config.soar if self.train_config is not None else SOARConfig()).shift)

    @property
    def guidance_scale(self) -> float:
        """This task's default classifier-free guidance scale (validation, `generate`, `soarflow sample`)."""
        return GUIDANCE_SCALE

    @property
    def validation_guidance_scale(self) -> float:
        value = self.data_config.validation_guidance_scale
        return self.guidance_scale if value is None else value

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        pipe = self.frozen()
        f = pipe.vae_scale_factor
        return (pipe.vae.config.latent_channels, height // f, width // f)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.frozen(latents.device).vae
        shift, scale = self.vae_factors()
        images = vae.decode((latents / scale + shift).to(vae.dtype)).sample
        return images.float().clamp(-1, 1)

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: Sequence[str], device: torch.device, *, num_steps: int,
                 guidance_scale: float | None = None, seed: int = 0, height: int | None = None,
                 width: int | None = None) -> torch.Tensor:
        """Images in [-1, 1] from `model` with soarflow's Euler sampler (same schedule/shift as the objective's
        rollout) at ``guidance_scale`` (default: the task's). Image i's noise depends only on (seed, i)."""
        guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
        res = self.data_config.validation_resolution or self.data_config.resolution
        shape = self.latent_shape(height or res, width or res)
        prompts = list(prompts)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                             for i in range(len(prompts))]).to(device)
        with self.frozen_on(device):
            cond = cond_to(self.encode_text(prompts, device), device, torch.float32)
        cond = self.finish_cond({k: v.float() for k, v in cond.items()})
        latents = sample_euler(model, noise, cond, null_cond=self.null_cond(len(prompts), device),
                               num_steps=num_steps, guidance_scale=guidance_scale, shift=self.sample_shift)
        with self.frozen_on(device):
            return self.decode(latents).cpu()

    def validation_images(self, model: nn.Module, device: torch.device) -> tuple[torch.Tensor, list[str]]:
        prompts = list(self.data_config.validation_prompts)
        if not prompts:
            raise ValueError("data.validation_prompts is empty; add prompts or set validation_steps: 0")
        images = self.generate(model, prompts, device, num_steps=self.data_config.validation_num_steps,
                               guidance_scale=self.validation_guidance_scale, seed=self.data_config.validation_seed)
        return images, prompts

    # -- weights -----------------------------------------------------------------------------------------
    def manifest(self, model: nn.Module) -> dict:
        return {
            "family": self.family,
            "finetune": "lora" if has_lora(model.transformer) else "full",
            "pretrained": self.model_config.pretrained,
            "revision": self.model_config.revision,
            "variant": self.model_config.variant,
            "sample_shift": self.sample_shift,
            "guidance": self.model_config.guidance,
            "embedded_guidance_scale": self.model_config.embedded_guidance_scale,
        }

    def save_model(self, model: nn.Module, path: Path) -> Path:
        """Full: ``path/transformer`` (save_pretrained); LoRA: ``path/pytorch_lora_weights.safetensors``.
        Replaces an earlier soarflow model in `path` (resumed run); refuses any other non-empty folder.
        Also flushes the encoding cache."""
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not (path / MANIFEST).is_file():
            raise ValueError(f"save_model: {path} is not empty and holds no soarflow model; refusing to overwrite it")
        if self._cache is not None:
            self._cache.flush()
        # Write next to the target and swap at the end, so a crash never leaves a half-written model and an
        # earlier model of this run (resumed training) is replaced only by a complete one.
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        transformer = model.transformer
        if has_lora(transformer):
            save_lora(self.pipeline_class, transformer, tmp)
        else:
            transformer.save_pretrained(tmp / "transformer")
        (tmp / MANIFEST).write_text(json.dumps(self.manifest(model), indent=1))
        if path.exists():
            old = path.with_name(path.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        logger.info("saved %s model to %s (%s)", self.family, path, self.bad_samples.summary())
        return path

    def load_model_weights(self, model: nn.Module, path: Path) -> None:
        path = Path(path)
        transformer = model.transformer
        if has_lora(transformer):
            load_lora(self.pipeline_class, transformer, path)
            return
        folder = path / "transformer"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no full transformer weights in {path} (expected {folder}/config.json)")
        loaded = self.transformer_class.from_pretrained(str(folder))
        missing, unexpected = transformer.load_state_dict(loaded.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


__all__ = [
    "DiffusersDataSection",
    "DiffusersModelSection",
    "DiffusersTask",
    "MANIFEST",
    "VelocityModule",
    "parse_sections",
]
