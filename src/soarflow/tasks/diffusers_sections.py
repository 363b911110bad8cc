"""The ``model:`` and ``data:`` config sections of the diffusers tasks (sd3, flux), checked when parsed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ..data import CACHE_DTYPES, IMAGE_FORMATS
from ..models.diffusers_pipeline import DTYPES
from ..models.lora import LoraSection
from ..utils.config_parsing import from_dict


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

    format: Literal["imagefolder", "soar_jsonl", "hf_dataset", "parquet", "hf_streaming", "webdataset"] = "imagefolder"
    path: str = ""  # folder (imagefolder, hf_dataset save_to_disk), JSONL (soar_jsonl), parquet file/folder/glob, hub id or local dataset (hf_streaming), tar shards (webdataset)
    image_dir: str | None = None  # soar_jsonl: folder of {md5}.jpg
    caption_column: str | None = None  # None: text (imagefolder, datasets), txt (webdataset member)
    image_column: str = "image"  # datasets / parquet image column
    split: str = "train"  # datasets split (DatasetDict folders, streaming)
    resolution: int = 512
    bucketing: bool = False  # aspect-ratio buckets of ~resolution^2 pixels
    bucket_divisor: int = 64
    max_aspect_ratio: float = 2.0
    random_flip: bool = False
    on_bad_sample: Literal["skip", "fail"] = "skip"
    max_samples: int | None = None  # use only the first N records
    cache_dir: str | None = None  # encoder cache (fill it with `soarflow cache`): VAE latents + text embeddings
    cache_shard_size: int = 256
    cache_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # stored precision of the cached encodings
    validation_prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a red apple on a table"])
    validation_num_steps: int = 28
    validation_guidance_scale: float | None = None  # None: the task's guidance_scale
    validation_seed: int = 0
    validation_resolution: int | None = None  # None: resolution

    def __post_init__(self) -> None:
        if self.format not in IMAGE_FORMATS:
            raise ValueError(f"config key 'format': must be one of {', '.join(IMAGE_FORMATS)} (got {self.format!r})")
        if not self.path:
            raise ValueError("config key 'path': required — the image folder (imagefolder), JSONL file (soar_jsonl), "
                             "saved dataset, parquet, dataset id or tar shards")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"config key 'cache_dtype': must be one of {', '.join(CACHE_DTYPES)} (got {self.cache_dtype!r})")
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
    return from_dict(model_cls, model or {}, prefix="model"), from_dict(data_cls, data or {}, prefix="data")
