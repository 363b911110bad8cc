r"""LAION aesthetic predictor v2 ("improved-aesthetic-predictor", ``sac+logos+ava1-l14-linearMSE``): an MLP on the
L2-normalised CLIP ViT-L/14 image embedding,

.. math:: a(x) = \mathrm{MLP}\big(e / \lVert e \rVert\big), \quad e = E_I(x),

with the MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (dropout between the first layers, no activations), as
improved-aesthetic-predictor, DDPO, Flow-GRPO and DiffusionNFT define it. Scores are on the 1-10 scale of the
ratings it was fit to (the paper reports 5.36 for SD3.5-M).

Weights: the CLIP tower from ``openai/clip-vit-large-patch14`` and the head's state dict (keys
``layers.{0,2,4,6,7}.{weight,bias}``) from a ``.pth``/``.safetensors`` file; by default TRL's copy,
``trl-lib/ddpo-aesthetic-predictor`` / ``aesthetic-model.pth``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .clip_score import load_clip_model, looks_local
from .images import CLIP_MEAN, CLIP_STD, check_batch, clip_pixels, features, missing_package, missing_weights

HEAD_REPO, HEAD_FILE = "trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"


class AestheticHead(nn.Module):
    """The predictor's MLP; `dims` default to the released head (768 -> 1024 -> 128 -> 64 -> 16 -> 1)."""

    def __init__(self, dims: Sequence[int] = (768, 1024, 128, 64, 16)):
        super().__init__()
        d = list(dims)
        self.layers = nn.Sequential(
            nn.Linear(d[0], d[1]),
            nn.Dropout(0.2),
            nn.Linear(d[1], d[2]),
            nn.Dropout(0.2),
            nn.Linear(d[2], d[3]),
            nn.Dropout(0.1),
            nn.Linear(d[3], d[4]),
            nn.Linear(d[4], 1),
        )

    def forward(self, embed: torch.Tensor) -> torch.Tensor:
        return self.layers(embed)


def load_head(path: str | Path) -> AestheticHead:
    """The head from a state-dict file (``.pth`` or ``.safetensors``); its sizes are read from the weights."""
    path = Path(path)
    if not path.is_file():
        raise missing_weights("aesthetic", "head weights", path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    try:
        dims = [state[f"layers.{i}.weight"].shape[1] for i in (0, 2, 4, 6, 7)]
    except KeyError as err:
        raise ValueError(f"{path}: not an aesthetic head state dict (no {err.args[0]!r})") from None
    head = AestheticHead(dims)
    head.load_state_dict(state)
    return head


class AestheticScorer:
    name = "aesthetic"

    def __init__(
        self,
        clip_model,
        head: AestheticHead,
        image_size: int,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        device: torch.device | str = "cpu",
    ):
        self.clip = clip_model.eval().requires_grad_(False).to(device)
        self.head = head.eval().requires_grad_(False).to(device)
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path = "openai/clip-vit-large-patch14",
        head: str | Path | None = None,
        device: torch.device | str = "cpu",
    ) -> "AestheticScorer":
        """CLIP from `path` (folder or hub id), the head from `head` (a file; default TRL's copy on the hub)."""
        if head is None:
            try:
                from huggingface_hub import hf_hub_download
            except ImportError:
                raise missing_package("aesthetic", "huggingface_hub") from None
            head = hf_hub_download(HEAD_REPO, HEAD_FILE)
        elif not looks_local(head):
            raise missing_weights("aesthetic", "head weights", head)
        model, _, mean, std = load_clip_model(path, cls.name)
        return cls(model, load_head(head), model.config.vision_config.image_size, mean, std, device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_batch("AestheticScorer", images, prompts)
        pixels = clip_pixels(images, self.image_size, self.mean, self.std).to(self.device)
        embed = features(self.clip.get_image_features(pixel_values=pixels)).float()
        embed = embed / embed.norm(dim=-1, keepdim=True)
        return self.head(embed.to(next(self.head.parameters()).dtype)).squeeze(-1).float().cpu()
