"""The ``model:`` and ``data:`` config sections of the diffusers tasks (sd3, flux), checked when parsed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ..data import CACHE_DTYPES, IMAGE_FORMATS
from ..models.diffusers_export import SAVE_DTYPES
from ..models.diffusers_pipeline import DTYPES
from ..models.lora import LoraSection
from ..models.quantize import QuantizeSection
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
    # LoRA on a quantized frozen base (models/quantize.py), e.g. {backend: quanto, weights: int8}; null: unquantized
    quantize_base: QuantizeSection | None = None
    # what the saved model looks like (train/export.py)
    save_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # dtype of the saved weights (checkpoints' model/ too)
    save_single_file: bool = False  # full fine-tune: also one .safetensors of the transformer (single-file format)
    save_comfyui_lora: bool = False  # LoRA: also the adapter in ComfyUI's key format (lora_transformer_*)

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
        if self.quantize_base is not None and self.finetune != "lora":
            raise ValueError(
                "config key 'quantize_base': only a LoRA run trains on a quantized base (the frozen "
                "weights are quantized, the adapters are not); set finetune: lora or remove quantize_base"
            )
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(
                f"config key 'save_dtype': must be one of {', '.join(SAVE_DTYPES)} (got {self.save_dtype!r})"
            )
        if self.save_single_file and self.finetune != "full":
            raise ValueError(
                "config key 'save_single_file': applies to a full fine-tune (a LoRA run saves one "
                "adapter file already; see save_comfyui_lora)"
            )
        if self.save_comfyui_lora and self.finetune != "lora":
            raise ValueError("config key 'save_comfyui_lora': applies to finetune: lora")


DATA_FORMATS = (*IMAGE_FORMATS, "prompts")


@dataclass
class DiffusersDataSection:
    """``data:`` for tasks sd3 and flux."""

    FORMER_KEYS: ClassVar[dict[str, str]] = {"validation_cfg": "validation_guidance_scale"}

    format: Literal["imagefolder", "soar_jsonl", "hf_dataset", "parquet", "hf_streaming", "webdataset", "prompts"] = (
        "imagefolder"
    )
    # folder (imagefolder, hf_dataset save_to_disk), JSONL (soar_jsonl), parquet file/folder/glob, hub id or local
    # dataset (hf_streaming), tar shards (webdataset); prompts (method grpo only): a .txt file (one prompt per line)
    # or .jsonl file (a "prompt" key per line), no images
    path: str = ""
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
        if self.format not in DATA_FORMATS:
            raise ValueError(f"config key 'format': must be one of {', '.join(DATA_FORMATS)} (got {self.format!r})")
        if not self.path:
            raise ValueError(
                "config key 'path': required — the image folder (imagefolder), JSONL file (soar_jsonl), "
                "saved dataset, parquet, dataset id, tar shards or prompt file (prompts)"
            )
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(
                f"config key 'cache_dtype': must be one of {', '.join(CACHE_DTYPES)} (got {self.cache_dtype!r})"
            )
        if self.format == "soar_jsonl" and not self.image_dir:
            raise ValueError("config key 'image_dir': required for format soar_jsonl (folder of {md5}.jpg)")
        if self.resolution < 8:
            raise ValueError(f"config key 'resolution': must be >= 8 (got {self.resolution})")
        if self.on_bad_sample not in ("skip", "fail"):
            raise ValueError(f"config key 'on_bad_sample': must be skip or fail (got {self.on_bad_sample!r})")
        if self.cache_dir and self.random_flip:
            raise ValueError(
                "config key 'cache_dir': the cache stores one latent per image, so it cannot be combined "
                "with random_flip; disable one of them"
            )
        if self.validation_num_steps < 1:
            raise ValueError(f"config key 'validation_num_steps': must be >= 1 (got {self.validation_num_steps})")


# The default classifier-free guidance scale of the diffusers tasks (SD3.5's; FLUX with model.guidance: cfg).
GUIDANCE_SCALE = 4.5


def parse_sections(
    model: dict | None, data: dict | None, model_cls=DiffusersModelSection, data_cls=DiffusersDataSection
):
    return from_dict(model_cls, model or {}, prefix="model"), from_dict(data_cls, data or {}, prefix="data")
