r"""CLIP-family scorers over a transformers ``CLIPModel``.

* :class:`CLIPScorer`: :math:`s \cdot \max(\cos(E_I(x), E_T(c)), 0)`. CLIPScore (Hessel et al. 2021) uses
  s = 100 (the default here); the paper's "ClipScore" column (0.285 for SD3.5-M) is the plain cosine of
  ``openai/clip-vit-large-patch14``, s = 1 without the clamp (``build_scorer("clip")``).
* :class:`PickScoreScorer`: PickScore (Kirstain et al. 2023, ``yuvalkirstain/PickScore_v1``, a fine-tuned
  CLIP-H): :math:`\exp(\text{logit\_scale}) \cdot \cos(E_I(x), E_T(c))` (about 100 x cos; 22.34 for SD3.5-M).

Images are resized and centre-cropped to the vision tower's size and normalised (:func:`images.clip_pixels`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .images import CLIP_MEAN, CLIP_STD, check_batch, clip_pixels, features, missing_package, missing_weights


def looks_local(path: str | Path) -> bool:
    """A path (absolute, relative with ./ or ../, or existing) rather than a hub id."""
    s = str(path)
    return Path(s).is_absolute() or s.startswith(".") or Path(s).exists() or s.count("/") > 1


def load_clip_model(path: str | Path, scorer: str, tokenizer_path: str | Path | None = None):
    """(CLIPModel, tokenizer, mean, std) from a local folder or a hub id (the tokenizer from `tokenizer_path` when
    the model's repository has none, as PickScore_v1 whose processor is CLIP-ViT-H-14's)."""
    try:
        from transformers import AutoTokenizer, CLIPModel
    except ImportError:
        raise missing_package(scorer, "transformers") from None
    if looks_local(path) and not (Path(path) / "config.json").is_file():
        raise missing_weights(scorer, "CLIP model folder (config.json)", path)
    model = CLIPModel.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path or path))
    mean, std = CLIP_MEAN, CLIP_STD
    pre = Path(path) / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
    return model, tokenizer, mean, std


class CLIPScorer:
    name = "clip"

    def __init__(
        self,
        model,
        tokenizer,
        image_size: int,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        scale: float = 100.0,
        device: torch.device | str = "cpu",
        clamp: bool = True,
    ):
        self.clamp = clamp
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale = scale
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path = "openai/clip-vit-large-patch14",
        device: torch.device | str = "cpu",
        scale: float = 100.0,
        clamp: bool = True,
    ) -> "CLIPScorer":
        """Load from a local folder (must hold config.json) or a hub id."""
        model, tokenizer, mean, std = load_clip_model(path, cls.name)
        return cls(
            model, tokenizer, model.config.vision_config.image_size, mean, std, scale=scale, device=device, clamp=clamp
        )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] (B, 3, H, W) -> CLIP input: shorter side to image_size (bicubic), center crop, normalise."""
        return clip_pixels(images, self.image_size, self.mean, self.std)

    def cosine(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_batch(type(self).__name__, images, prompts)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt").to(
            self.device
        )
        text = features(self.model.get_text_features(**tokens))
        image = features(self.model.get_image_features(pixel_values=self.preprocess(images).to(self.device)))
        return F.cosine_similarity(image.float(), text.float(), dim=-1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        cos = self.cosine(images, prompts)
        return (self.scale * (cos.clamp_min(0) if self.clamp else cos)).cpu()


class PickScoreScorer(CLIPScorer):
    """PickScore: the model's own logit scale times the cosine (no clamp)."""

    name = "pickscore"

    def __init__(
        self,
        model,
        tokenizer,
        image_size: int,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        device: torch.device | str = "cpu",
    ):
        super().__init__(
            model, tokenizer, image_size, mean, std, scale=float(model.logit_scale.detach().exp()), device=device
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path = "yuvalkirstain/PickScore_v1",
        device: torch.device | str = "cpu",
        tokenizer_path: str | Path | None = None,
        **kw,
    ) -> "PickScoreScorer":
        """PickScore_v1 from the hub takes its tokenizer from laion/CLIP-ViT-H-14-laion2B-s32B-b79K; a local folder
        must hold its own."""
        if tokenizer_path is None and str(path) == "yuvalkirstain/PickScore_v1":
            tokenizer_path = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
        model, tokenizer, mean, std = load_clip_model(path, cls.name, tokenizer_path)
        return cls(model, tokenizer, model.config.vision_config.image_size, mean, std, device=device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return (self.scale * self.cosine(images, prompts)).cpu()
