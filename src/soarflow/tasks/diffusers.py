r"""What the SD3 and FLUX tasks share: building the model, data, encoding (with its cache), validation, saving.

A :class:`DiffusersTask` implements the trainer's `Task` protocol for one diffusers pipeline family. The
trainable model is a small `nn.Module` holding the family's transformer and exposing the velocity interface
``model(x, sigma, cond)`` (x: VAE latents (B, C, h, w); sigma (B,) in [0, 1]; cond: a dict of batch-first
tensors). The frozen parts — VAE and text encoders (:class:`soarflow.models.diffusers_pipeline.FrozenPipeline`)
— stay in the task, so only the transformer is prepared by accelerate, checkpointed and saved.

Latents follow the pipelines: :math:`x_0 = (\mathrm{VAE}(img) - \text{shift}) \cdot \text{scale}` with the
VAE's ``shift_factor``/``scaling_factor``; decoding inverts it. The null condition is the encoding of the
empty prompt, as the pipelines' classifier-free guidance uses for an empty negative prompt. The config sections
are in :mod:`.diffusers_sections`, the saved model folder in :mod:`soarflow.models.diffusers_weights`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

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
from ..data.prompts import PromptDataset, collate_prompts, is_prompt_batch
from ..models.diffusers_pipeline import DTYPES, FrozenPipeline, check_pretrained
from ..models.diffusers_velocity import VelocityModule
from ..models.diffusers_weights import SaveOptions, load_model_folder, save_model_folder
from ..models.lora import add_lora, has_lora
from ..models.quantize import is_quantized, quantization_config
from ..objective import SOARConfig
from ..sampling import sample_euler
from .base import Task
from .diffusers_sections import GUIDANCE_SCALE, DiffusersDataSection, DiffusersModelSection, parse_sections

logger = logging.getLogger(__name__)

NULL_ENTRY = "__empty_prompt__"


class DiffusersTask(Task):
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
        self.pipeline = FrozenPipeline(self.pipeline_class_name, model.pretrained, revision=model.revision,
                                       variant=model.variant, dtype=DTYPES[model.frozen_dtype],
                                       offload=model.offload_frozen)  # loaded on first use
        self._null: dict[torch.device, Any] = {}
        self._cache: EncodingCache | None = None

    @classmethod
    def from_config(cls, model: dict | None, data: dict | None, train_config: Any = None):
        model_dict = dict(model or {})
        model_dict.setdefault("max_sequence_length", cls.default_max_sequence_length)
        m, d = parse_sections(model_dict, data)
        task = cls(m, d, train_config)
        task.check_config()
        method = getattr(train_config, "method", None)
        if d.format == "prompts" and method not in (None, "grpo"):
            raise ValueError(f"config key 'data.format': 'prompts' holds no images, so only method grpo can train on "
                             f"it (method is {method!r}); give an image dataset (imagefolder or soar_jsonl)")
        return task

    def check_config(self) -> None:
        """Family-specific checks of the combined config (override)."""

    # -- model -------------------------------------------------------------------------------------------
    @property
    def transformer_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.transformer_class_name)

    def load_transformer(self) -> nn.Module:
        """The base transformer; with ``model.quantize_base`` loaded through that diffusers quantization config (its
        unquantized parts in ``frozen_dtype``)."""
        check_pretrained(self.model_config.pretrained)
        extra: dict[str, Any] = {}
        if self.model_config.quantize_base is not None:
            extra = {"quantization_config": quantization_config(self.model_config.quantize_base, self.pipeline.dtype),
                     "torch_dtype": self.pipeline.dtype}
        return self.transformer_class.from_pretrained(self.model_config.pretrained, subfolder="transformer",
                                                      **self.pipeline.load_kwargs, **extra)

    def wrap(self, transformer: nn.Module) -> VelocityModule:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        transformer = self.load_transformer()
        if self.model_config.finetune == "lora":
            if self.pipeline.dtype != torch.float32 and not is_quantized(transformer):
                transformer.to(self.pipeline.dtype)
            add_lora(transformer, self.model_config.lora)
            for name, p in transformer.named_parameters():  # adapters train in float32 (mixed precision autocasts)
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            transformer.requires_grad_(True)
        return self.wrap(transformer)

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

    def train_dataset(self) -> ImageCaptionDataset | PromptDataset:
        d = self.data_config
        if d.format == "prompts":
            return PromptDataset.from_file(d.path, d.max_samples)
        return ImageCaptionDataset(
            self.records(), d.resolution, bucketing=d.bucketing, bucket_divisor=d.bucket_divisor,
            max_aspect_ratio=d.max_aspect_ratio, random_flip=d.random_flip, bad_samples=self.bad_samples,
        )

    def batch_indices(self, dataset: ImageCaptionDataset, global_batch: int, seed: int, epoch: int) -> list[list[int]] | None:
        """With ``data.bucketing``: the epoch's global batches, each drawn from one aspect bucket (seeded by
        seed and epoch); None without bucketing (plain random batches). For a trainer that supports it; otherwise
        `collate` brings mixed batches to their most common bucket."""
        if not self.data_config.bucketing or self.data_config.format == "prompts":
            return None
        return bucketed_batches([dataset.bucket_of(i) for i in range(len(dataset))], global_batch, seed, epoch)

    def collate(self, samples: Sequence[dict]) -> dict:
        return collate_images(samples) if samples and "pixel_values" in samples[0] else collate_prompts(samples)

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

    def frozen_on(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The frozen pipeline on `device`; with ``model.offload_frozen`` it goes back to the CPU afterwards."""
        return self.pipeline.on(device)

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
        if is_prompt_batch(batch):
            raise ValueError("data.format 'prompts': the batch holds prompts and no images; only method grpo "
                             "trains on a prompt file")
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
        shift, scale = self.pipeline.vae_factors()
        x0 = (mean + std * torch.randn_like(mean) - shift) * scale
        keys = [k for k in entries[0] if k.startswith("cond.")]
        cond = {k[5:]: torch.stack([e[k].to(device) for e in entries]) for k in keys}
        return x0, self.finish_cond(cond)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a height x width image, from the VAE's config.json (no weights loaded)
        when ``model.pretrained`` is a local folder; otherwise from the loaded pipeline."""
        config = Path(self.model_config.pretrained) / "vae" / "config.json"
        if not config.is_file():
            return self.pipeline.latent_shape(height, width)
        vae = json.loads(config.read_text())
        factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
        if height % factor or width % factor:
            raise ValueError(f"image size {height}x{width} is not a multiple of the VAE's downsampling factor {factor}")
        return (int(vae["latent_channels"]), height // factor, width // factor)

    @torch.no_grad()
    def encode_prompts(self, batch: dict, n: int, device: torch.device) -> tuple[tuple[int, ...], dict]:
        """``(sample_shape, cond)`` for the first ``n`` captions of ``batch``: the text condition and the latent
        shape of the batch's images (an image batch) or of ``data.resolution`` (a prompt batch). Encodes no
        image."""
        captions = [str(c) for c in list(batch["caption"])[:n]]
        if "pixel_values" in batch:
            h, w = batch["pixel_values"].shape[-2:]
        else:
            h = w = self.data_config.resolution
        with self.frozen_on(device):
            cond = cond_to(self.encode_text(captions, device), device, torch.float32)
        return self.latent_shape(int(h), int(w)), self.finish_cond({k: v.float() for k, v in cond.items()})

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

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pipeline.decode(latents)

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: Sequence[str], device: torch.device, *, num_steps: int,
                 guidance_scale: float | None = None, seed: int = 0, height: int | None = None,
                 width: int | None = None) -> torch.Tensor:
        """Images in [-1, 1] from `model` with soarflow's Euler sampler (same schedule/shift as the objective's
        rollout) at ``guidance_scale`` (default: the task's). Image i's noise depends only on (seed, i)."""
        guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
        res = self.data_config.validation_resolution or self.data_config.resolution
        shape = self.pipeline.latent_shape(height or res, width or res)
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
            # the base the adapter was trained on (it loads onto the unquantized base as well)
            "quantize_base": (None if self.model_config.quantize_base is None else
                              f"{self.model_config.quantize_base.backend} {self.model_config.quantize_base.weights}"),
        }

    def save_model(self, model: nn.Module, path: Path) -> Path:
        """The folder of :mod:`soarflow.models.diffusers_weights`; also flushes the encoding cache."""
        if self._cache is not None:
            self._cache.flush()
        m = self.model_config
        options = SaveOptions(family=self.family, save_dtype=m.save_dtype, single_file=m.save_single_file,
                              comfyui_lora=m.save_comfyui_lora)
        path = save_model_folder(Path(path), model.transformer, self.pipeline.pipeline_class, self.manifest(model),
                                 options)
        logger.info("saved %s model to %s (%s)", self.family, path, self.bad_samples.summary())
        return path

    def load_model_weights(self, model: nn.Module, path: Path) -> None:
        load_model_folder(Path(path), model.transformer, self.pipeline.pipeline_class, self.transformer_class)


__all__ = ["DiffusersTask"]
