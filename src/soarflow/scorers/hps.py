r"""HPSv2.1 (Wu et al. 2023, Human Preference Score v2.1): an open_clip ViT-H-14 fine-tuned on human preference
pairs; the score is the cosine of its image and text embeddings (the diagonal of ``image_features @
text_features.T`` of normalised features, as the ``hpsv2`` package computes it; 0.279 for SD3.5-M in the paper):

.. math:: \mathrm{HPS}(x, c) = \cos(E_I(x), E_T(c)).

Weights: ``HPS_v2.1_compressed.pt`` from the hub repository ``xswu/HPSv2`` (a checkpoint with a ``state_dict`` of
the open_clip model), loaded into ``open_clip.create_model("ViT-H-14")``. The ``hpsv2`` package itself pins
pytest 7.2 and protobuf 3.20, so soarflow does not depend on it: only on open_clip (extra ``eval``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .clip_score import looks_local
from .images import CLIP_MEAN, CLIP_STD, check_batch, clip_pixels, missing_package, missing_weights

HPS_REPO, HPS_FILE, HPS_ARCH = "xswu/HPSv2", "HPS_v2.1_compressed.pt", "ViT-H-14"


def _open_clip(scorer: str):
    try:
        import open_clip
    except ImportError:
        raise missing_package(scorer, "open_clip") from None
    return open_clip


class HPSv2Scorer:
    name = "hpsv2"

    def __init__(
        self,
        model,
        tokenizer,
        image_size: int,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        device: torch.device | str = "cpu",
    ):
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer = tokenizer
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, arch: str = HPS_ARCH, device: torch.device | str = "cpu"
    ) -> "HPSv2Scorer":
        """`path`: the checkpoint file (default: HPS_v2.1_compressed.pt from the hub); `arch`: the open_clip model
        name it was trained from."""
        open_clip = _open_clip(cls.name)
        if path is None:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(HPS_REPO, HPS_FILE)
        elif not looks_local(path) or not Path(path).is_file():
            raise missing_weights(cls.name, "checkpoint", path)
        model = open_clip.create_model(arch, pretrained=None)
        state = torch.load(str(path), map_location="cpu", weights_only=False)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean = getattr(model.visual, "image_mean", None) or CLIP_MEAN
        std = getattr(model.visual, "image_std", None) or CLIP_STD
        return cls(model, open_clip.get_tokenizer(arch), int(size), mean, std, device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_batch("HPSv2Scorer", images, prompts)
        pixels = clip_pixels(images, self.image_size, self.mean, self.std).to(self.device)
        image = self.model.encode_image(pixels).float()
        text = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float()
        return F.cosine_similarity(image, text, dim=-1).cpu()
