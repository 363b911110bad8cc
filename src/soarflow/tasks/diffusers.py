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
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..conditioning import cond_repeat, cond_to
from ..data import (
    CACHE_DTYPES,
    BadSampleLog,
    DataIndex,
    DataSource,
    EncodingCache,
    ImageCaptionDataset,
    ImageCaptionRecord,
    bucketed_batches,
    collate_images,
    latent_key,
    read_records,
    source_id,
    text_key,
)
from ..data.encode_cache import dataset_latent_keys, latent_shapes, missing_entries, unreadable_images
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
        self.pipeline = FrozenPipeline(
            self.pipeline_class_name,
            model.pretrained,
            revision=model.revision,
            variant=model.variant,
            dtype=DTYPES[model.frozen_dtype],
            offload=model.offload_frozen,
        )  # loaded on first use
        self._null: dict[torch.device, Any] = {}
        self._caches: tuple[EncodingCache, EncodingCache] | None = None
        self._records: list[ImageCaptionRecord] | None = None
        self.cache_complete = False  # set by train_dataset: every encoding the run needs is in the cache
        self.encode_device = torch.device("cpu")  # where encode_captions / encode_pixels run by default

    @classmethod
    def from_config(cls, model: dict | None, data: dict | None, train_config: Any = None):
        model_dict = dict(model or {})
        model_dict.setdefault("max_sequence_length", cls.default_max_sequence_length)
        m, d = parse_sections(model_dict, data)
        task = cls(m, d, train_config)
        task.check_config()
        method = getattr(train_config, "method", None)
        if d.format == "prompts" and method not in (None, "grpo"):
            raise ValueError(
                f"config key 'data.format': 'prompts' holds no images, so only method grpo can train on "
                f"it (method is {method!r}); give an image dataset (imagefolder or soar_jsonl)"
            )
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
            extra = {
                "quantization_config": quantization_config(self.model_config.quantize_base, self.pipeline.dtype),
                "torch_dtype": self.pipeline.dtype,
            }
        return self.transformer_class.from_pretrained(
            self.model_config.pretrained, subfolder="transformer", **self.pipeline.load_kwargs, **extra
        )

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
    def data_source(self) -> DataSource:
        d = self.data_config
        return DataSource(d.format, d.path, d.image_dir, d.caption_column, d.image_column, d.split, d.max_samples)

    def index_path(self) -> Path | None:
        """Where the data index (image sizes and hashes) is kept: under ``cache_dir/index/`` with a cache, else
        beside the data (a hidden file) when that folder is writable; None: in memory only."""
        d = self.data_config
        sid = source_id(
            {
                "format": d.format,
                "path": str(Path(d.path).resolve()) if Path(d.path).exists() else d.path,
                "image_dir": d.image_dir,
                "caption_column": d.caption_column,
                "image_column": d.image_column,
                "split": d.split,
            }
        )
        if d.cache_dir is not None:
            return Path(d.cache_dir) / "index" / f"{sid}.json"
        p = Path(d.path)
        folder = p if p.is_dir() else p.parent
        if folder.is_dir() and os.access(folder, os.W_OK):
            return folder / f".soarflow_index-{sid}.json"
        return None

    def records(self) -> list[ImageCaptionRecord]:
        """The dataset's records, bad samples reported; with bucketing or a cache also their image sizes and
        hashes from the data index (images are read only the first time they are seen)."""
        if self._records is not None:
            return self._records
        d = self.data_config
        recs = read_records(self.data_source(), self.bad_samples)
        if d.bucketing or d.cache_dir is not None:
            index = DataIndex(self.index_path())
            recs = [
                replace(rec, width=e.width, height=e.height, sha256=e.sha256)
                for rec, e in index.update(recs, self.bad_samples)
            ]
            logger.info("data index %s: %d images read", index.path, index.reads)
        logger.info("%s: %d samples, %s", d.path, len(recs), self.bad_samples.summary())
        self._records = recs
        return recs

    def _dataset(self, records, pixels: bool = True) -> ImageCaptionDataset:
        d = self.data_config
        return ImageCaptionDataset(
            records,
            d.resolution,
            bucketing=d.bucketing,
            bucket_divisor=d.bucket_divisor,
            max_aspect_ratio=d.max_aspect_ratio,
            random_flip=d.random_flip,
            bad_samples=self.bad_samples,
            pixels=pixels,
        )

    def train_dataset(self) -> ImageCaptionDataset | PromptDataset:
        """The training samples. ``data.format: prompts``: the prompts alone (grpo). With ``data.cache_dir``
        holding every encoding the run needs (filled by ``soarflow cache``), the items carry no pixels (no image is
        opened) and images `soarflow cache` could not decode are left out; otherwise images are decoded and missing
        encodings are computed and stored."""
        d = self.data_config
        if d.format == "prompts":
            return PromptDataset.from_file(d.path, d.max_samples)
        dataset = self._dataset(self.records())
        if self.data_config.cache_dir is None:
            return dataset
        text, latents = self.caches()
        bad = unreadable_images(latents)
        if bad:
            keys = dataset_latent_keys(dataset)
            kept = []
            for rec, key in zip(dataset.records, keys):
                if key in bad:
                    self.bad_samples.report(rec.name, bad[key])
                else:
                    kept.append(rec)
            dataset = self._dataset(kept)
        captions, images = missing_entries(text, latents, dataset, self.data_config.validation_prompts)
        if not captions and not images:
            logger.info(
                "encoder cache %s is complete: training reads it and builds no encoder", self.data_config.cache_dir
            )
            self.cache_complete = True
            return self._dataset(dataset.records, pixels=False)
        logger.warning(
            "encoder cache %s lacks %d captions and %d images: they are encoded during training (run "
            "`soarflow cache --config <config>` first to encode them on every process before training)",
            self.data_config.cache_dir,
            len(captions),
            len(images),
        )
        return dataset

    def batch_indices(
        self, dataset: ImageCaptionDataset, global_batch: int, seed: int, epoch: int
    ) -> list[list[int]] | None:
        """With ``data.bucketing``: the epoch's global batches, each drawn from one aspect bucket (seeded by
        seed and epoch); None without bucketing (plain random batches). For a trainer that supports it; otherwise
        `collate` brings mixed batches to their most common bucket."""
        if not self.data_config.bucketing or self.data_config.format == "prompts":
            return None
        return bucketed_batches([dataset.bucket_of(i) for i in range(len(dataset))], global_batch, seed, epoch)

    def collate(self, samples: Sequence[dict]) -> dict:
        # an image dataset's item always has its size, also without pixels (a complete encoder cache)
        images = samples and ("pixel_values" in samples[0] or "size" in samples[0])
        return collate_images(samples) if images else collate_prompts(samples)

    def data_summary(self) -> str:
        """One line for the run summary: how many bad samples were skipped (and which)."""
        return self.bad_samples.summary()

    # -- encoding ----------------------------------------------------------------------------------------
    def encode_text(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Family-specific: the condition dict for `prompts` (float32 tensors on `device`)."""
        raise NotImplementedError

    def _model_identity(self) -> dict:
        m = self.model_config
        p = Path(m.pretrained)
        return {
            "family": self.family,
            "pretrained": str(p.resolve()) if p.exists() else m.pretrained,
            "revision": m.revision,
            "variant": m.variant,
            "frozen_dtype": m.frozen_dtype,
            "cache_dtype": self.data_config.cache_dtype,
        }

    def _component_configs(self, names: Sequence[str]) -> dict:
        """The components' config files (read from disk: checking the cache loads no weights)."""
        spec = {}
        root = Path(self.model_config.pretrained)
        for name in names:
            for file in ("config.json", "tokenizer_config.json"):
                if (root / name / file).is_file():
                    spec[f"{name}/{file}"] = json.loads((root / name / file).read_text())
        return spec

    def text_cache_spec(self) -> dict:
        """What the cached text conditions depend on (its hash names the text cache folder)."""
        return {
            **self._model_identity(),
            "max_sequence_length": self.model_config.max_sequence_length,
            **self._component_configs(
                ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
            ),
        }

    def latent_cache_spec(self) -> dict:
        """What the cached VAE posteriors depend on (its hash names the latent cache folder; the crop size is
        part of each entry's name)."""
        return {**self._model_identity(), **self._component_configs(("vae",))}

    def caches(self) -> tuple[EncodingCache, EncodingCache]:
        """(text cache, latent cache) under ``data.cache_dir`` (see :mod:`soarflow.data.cache`)."""
        if self.data_config.cache_dir is None:
            raise ValueError("config key 'data.cache_dir': not set; the encoder cache needs a folder")
        if self._caches is None:
            rank = 0
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank = torch.distributed.get_rank()
            d = self.data_config
            dtype = CACHE_DTYPES[d.cache_dtype]
            self._caches = (
                EncodingCache(d.cache_dir, self.text_cache_spec(), d.cache_shard_size, rank, dtype, "text-"),
                EncodingCache(d.cache_dir, self.latent_cache_spec(), d.cache_shard_size, rank, dtype, "latent-"),
            )
        return self._caches

    def cache(self) -> EncodingCache | None:
        """The latent cache (None without ``data.cache_dir``)."""
        return self.caches()[1] if self.data_config.cache_dir is not None else None

    def frozen_on(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The frozen pipeline on `device`; with ``model.offload_frozen`` it goes back to the CPU afterwards."""
        return self.pipeline.on(device)

    # the encoders, batched, as `soarflow cache` uses them (soarflow.data.encode_cache.Encoder)
    @torch.no_grad()
    def encode_captions(self, prompts: list[str], device: torch.device | None = None) -> list[dict[str, torch.Tensor]]:
        """Per prompt, its text condition (float32, CPU)."""
        device = torch.device(device or self.encode_device)
        with self.frozen_on(device):
            text = self.encode_text(list(prompts), device)
        return [{k: v[i].float().cpu() for k, v in text.items()} for i in range(len(prompts))]

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, device: torch.device | None = None) -> list[dict[str, torch.Tensor]]:
        """Per image of (B, 3, h, w) in [-1, 1], the VAE posterior ``latent_mean`` / ``latent_std`` (float32, CPU)."""
        device = torch.device(device or self.encode_device)
        with self.frozen_on(device) as pipe:
            vae = pipe.vae
            dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        return [
            {"latent_mean": dist.mean[i].float().cpu(), "latent_std": dist.std[i].float().cpu()}
            for i in range(pixels.shape[0])
        ]

    def text_condition(self, prompts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The stacked text condition of `prompts` (float32 on `device`): from the cache when it holds them
        (checked: fields, shapes, finite), else encoded (and stored when there is a cache)."""
        prompts = list(prompts)
        if self.data_config.cache_dir is None:
            with torch.no_grad(), self.frozen_on(device):
                return {k: v.float() for k, v in self.encode_text(prompts, device).items()}
        text, _ = self.caches()
        schema = text.schema()
        names = [text_key(p) for p in prompts]
        entries: list[dict | None] = [text.load(n, schema) if n in text else None for n in names]
        missing = sorted({prompts[i] for i, e in enumerate(entries) if e is None})
        if missing:
            fresh = dict(zip(missing, self.encode_captions(missing, device)))
            for p, tensors in fresh.items():
                text.set_schema(tensors)
                text.put(text_key(p), tensors)
            entries = [e if e is not None else fresh[p] for e, p in zip(entries, prompts)]
        return {k: torch.stack([e[k] for e in entries]).to(device) for k in entries[0]}

    def _latent_posteriors(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE posterior of the batch's images: from the cache by content, else encoded."""
        pixels = batch.get("pixel_values")
        sizes = batch["size"]
        latents = self.cache()
        names = (
            [latent_key(sha, h, w) if sha is not None else None for sha, (h, w) in zip(batch["sha256"], sizes)]
            if latents is not None
            else [None] * len(sizes)
        )
        entries: list[dict | None] = []
        for name, (h, w) in zip(names, sizes):
            if name is not None and (name in latents or pixels is None):
                entries.append(latents.load(name, latent_shapes(self.latent_shape, h, w)))
            else:
                entries.append(None)
        missing = [i for i, e in enumerate(entries) if e is None]
        if missing:
            fresh = self.encode_pixels(pixels[missing], device)
            for i, e in zip(missing, fresh):
                entries[i] = e
                if names[i] is not None:
                    latents.put(names[i], e)
        mean = torch.stack([e["latent_mean"] for e in entries]).to(device)
        std = torch.stack([e["latent_std"] for e in entries]).to(device)
        return mean, std

    @torch.no_grad()
    def encode_batch(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
        r"""``(x0, cond)``: latents :math:`(z - \text{shift})\cdot\text{scale}` with z drawn from the VAE posterior,
        and the text condition. With ``data.cache_dir`` the posterior and condition are read from the cache
        (entries named by content) when present and written to it otherwise; a batch without pixels (a complete
        cache) must be in the cache."""
        if is_prompt_batch(batch):
            raise ValueError(
                "data.format 'prompts': the batch holds prompts and no images; only method grpo trains on a prompt file"
            )
        self.encode_device = torch.device(device)
        mean, std = self._latent_posteriors(batch, device)
        shift, scale = self.pipeline.vae_factors()
        x0 = (mean + std * torch.randn_like(mean) - shift) * scale
        cond = self.text_condition(batch["caption"], device)
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
        """The empty prompt's condition (read from the encoder cache when there is one)."""
        device = torch.device(device)
        if device not in self._null:
            self._null[device] = self.finish_cond(self.text_condition([""], device))
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
    def generate(
        self,
        model: nn.Module,
        prompts: Sequence[str],
        device: torch.device,
        *,
        num_steps: int,
        guidance_scale: float | None = None,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
    ) -> torch.Tensor:
        """Images in [-1, 1] from `model` with soarflow's Euler sampler (same schedule/shift as the objective's
        rollout) at ``guidance_scale`` (default: the task's). Image i's noise depends only on (seed, i)."""
        guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
        res = self.data_config.validation_resolution or self.data_config.resolution
        shape = self.pipeline.latent_shape(height or res, width or res)
        prompts = list(prompts)
        noise = torch.stack(
            [
                torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                for i in range(len(prompts))
            ]
        ).to(device)
        cond = self.finish_cond(cond_to(self.text_condition(prompts, device), device, torch.float32))
        latents = sample_euler(
            model,
            noise,
            cond,
            null_cond=self.null_cond(len(prompts), device),
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            shift=self.sample_shift,
        )
        return self.decode(latents).cpu()

    def validation_images(self, model: nn.Module, device: torch.device) -> tuple[torch.Tensor, list[str]]:
        prompts = list(self.data_config.validation_prompts)
        if not prompts:
            raise ValueError("data.validation_prompts is empty; add prompts or set validation_steps: 0")
        images = self.generate(
            model,
            prompts,
            device,
            num_steps=self.data_config.validation_num_steps,
            guidance_scale=self.validation_guidance_scale,
            seed=self.data_config.validation_seed,
        )
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
            "quantize_base": (
                None
                if self.model_config.quantize_base is None
                else f"{self.model_config.quantize_base.backend} {self.model_config.quantize_base.weights}"
            ),
        }

    def save_model(self, model: nn.Module, path: Path) -> Path:
        """The folder of :mod:`soarflow.models.diffusers_weights`; also flushes the encoder cache."""
        for cache in self._caches or ():
            cache.flush()
        m = self.model_config
        options = SaveOptions(
            family=self.family,
            save_dtype=m.save_dtype,
            single_file=m.save_single_file,
            comfyui_lora=m.save_comfyui_lora,
        )
        path = save_model_folder(
            Path(path), model.transformer, self.pipeline.pipeline_class, self.manifest(model), options
        )
        logger.info("saved %s model to %s (%s)", self.family, path, self.bad_samples.summary())
        return path

    def load_model_weights(self, model: nn.Module, path: Path) -> None:
        load_model_folder(Path(path), model.transformer, self.pipeline.pipeline_class, self.transformer_class)


__all__ = ["DiffusersTask"]
