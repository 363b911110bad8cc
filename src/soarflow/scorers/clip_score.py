r"""CLIPScore-style scorer (Hessel et al. 2021): :math:`100 \cdot \max(\cos(E_I(x), E_T(c)), 0)` with a CLIP
model loaded from a local folder (``CLIPModel`` + its tokenizer; images are resized and center-cropped to
the vision tower's size and normalised with the image processor's mean/std). A PickScore-style preference
model is the same computation with its own checkpoint (its logit scale instead of 100)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F


class CLIPScorer:
    def __init__(self, model, tokenizer, image_size: int, mean: Sequence[float], std: Sequence[float],
                 scale: float = 100.0, device: torch.device | str = "cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.scale = scale
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu", scale: float = 100.0) -> "CLIPScorer":
        """Load from a local folder (never a download: the path must exist)."""
        from transformers import AutoTokenizer, CLIPModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"CLIP model folder not found or incomplete (no config.json): {path}")
        model = CLIPModel.from_pretrained(str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
        if (path / "preprocessor_config.json").is_file():
            import json

            pre = json.loads((path / "preprocessor_config.json").read_text())
            mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
        return cls(model, tokenizer, model.config.vision_config.image_size, mean, std, scale, device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] (B, 3, H, W) -> CLIP input: shorter side to image_size (bicubic), center crop, normalise."""
        x = (images.float().clamp(-1, 1) + 1) / 2
        h, w = x.shape[-2:]
        s = self.image_size / min(h, w)
        x = F.interpolate(x, size=(max(self.image_size, round(h * s)), max(self.image_size, round(w * s))),
                          mode="bicubic", align_corners=False).clamp(0, 1)
        top, left = (x.shape[-2] - self.image_size) // 2, (x.shape[-1] - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.shape[0] != len(prompts):
            raise ValueError(f"CLIPScorer: {images.shape[0]} images but {len(prompts)} prompts")
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        text = self.model.get_text_features(**tokens)
        image = self.model.get_image_features(pixel_values=self.preprocess(images).to(self.device))
        text = getattr(text, "pooler_output", text)
        image = getattr(image, "pooler_output", image)
        cos = F.cosine_similarity(image.float(), text.float(), dim=-1)
        return (self.scale * cos.clamp_min(0)).cpu()
