r"""ImageReward (Xu et al. 2023): BLIP's ViT encodes the image, BLIP's BERT text encoder reads the prompt with
cross-attention to the image tokens, and an MLP on the text [CLS] feature gives the reward, standardised with the
mean and std of its training rewards:

.. math:: r(x, c) = \big(\mathrm{MLP}(h_{\mathrm{CLS}}(c \mid E_I(x))) - \mu\big) / \sigma,
   \quad \mu = 0.16717362830052426,\ \sigma = 1.0333394966054072.

Images: resized (shorter side, bicubic) and centre-cropped to 224, normalised with CLIP's mean and std; prompts
padded to 35 tokens. The paper reports 0.85 for SD3.5-M.

Weights (``ImageReward-v1.0``) load through the ``image-reward`` package (``import ImageReward``), which pins
timm 0.6.13 and fairscale: install it in the evaluation environment (``pip install image-reward``), not in the
training one. :class:`BlipReward` is the same architecture on transformers' BLIP classes, used for stand-ins and
for a reward that must stay differentiable.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .aesthetic import AestheticHead
from .images import CLIP_MEAN, CLIP_STD, check_batch, clip_pixels, missing_package

REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class BlipReward(nn.Module):
    """ImageReward's architecture on transformers' ``BlipVisionModel`` + ``BlipTextModel`` (with cross-attention)."""

    def __init__(
        self,
        vision: nn.Module,
        text: nn.Module,
        head: AestheticHead | None = None,
        mean: float = REWARD_MEAN,
        std: float = REWARD_STD,
    ):
        super().__init__()
        self.vision, self.text = vision, text
        self.head = head or AestheticHead((text.config.hidden_size, 1024, 128, 64, 16))
        self.mean, self.std = mean, std

    @classmethod
    def from_configs(cls, vision_config, text_config, **kw) -> "BlipReward":
        from transformers import BlipTextModel, BlipVisionModel

        text = BlipTextModel(text_config, add_pooling_layer=False)
        hidden = text_config.hidden_size
        return cls(BlipVisionModel(vision_config), text, AestheticHead((hidden, 4 * hidden, 16, 8, 4)), **kw)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        image = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        h = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image,
            encoder_attention_mask=image_mask,
        ).last_hidden_state[:, 0]
        return ((self.head(h) - self.mean) / self.std).squeeze(-1)


class ImageRewardScorer:
    name = "imagereward"

    def __init__(
        self,
        reward: RewardFn,
        tokenizer,
        image_size: int = 224,
        max_length: int = 35,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        device: torch.device | str = "cpu",
    ):
        if isinstance(reward, nn.Module):
            reward = reward.eval().requires_grad_(False).to(device)
        self.reward, self.tokenizer = reward, tokenizer
        self.image_size, self.max_length, self.mean, self.std = image_size, max_length, tuple(mean), tuple(std)
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, path: str = "ImageReward-v1.0", device: torch.device | str = "cpu") -> "ImageRewardScorer":
        """Through the ``image-reward`` package: `path` is its model name or a checkpoint file."""
        try:
            import ImageReward as RM
        except ImportError:
            raise missing_package(cls.name, "ImageReward") from None
        model = RM.load(str(path), device=str(device))
        model.eval().requires_grad_(False)

        def reward(pixels, ids, mask):
            return model.score_gard(ids, mask, pixels).reshape(-1)

        return cls(reward, model.blip.tokenizer, 224, device=device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_batch("ImageRewardScorer", images, prompts)
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        pixels = clip_pixels(images, self.image_size, self.mean, self.std).to(self.device)
        return self.reward(pixels, tokens["input_ids"], tokens["attention_mask"]).float().reshape(-1).cpu()
