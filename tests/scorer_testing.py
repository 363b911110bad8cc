"""Tiny random-weight stand-ins for every `soarflow eval` scorer, built offline from configs.

Each has the real scorer's architecture and loading path at toy size: CLIP / PickScore / aesthetic over a tiny
transformers ``CLIPModel`` folder (`diffusers_testing.build_tiny_clip`), HPSv2 over a tiny open_clip model
registered as ``tiny-hps`` and saved as an HPS-style checkpoint (only where open_clip imports: `open_clip_missing`),
ImageReward over a tiny transformers BLIP
(`BlipReward`), OCR with a deterministic fake reader, GenEval with a fake detector and colour classifier whose
outputs are functions of the pixels only (so two processes must give one process's numbers).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch

from diffusers_testing import build_clip_tokenizer, build_tiny_clip

HPS_ARCH = "tiny-hps"
TINY_HPS_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@functools.lru_cache(maxsize=None)
def open_clip_missing() -> str | None:
    """None where open_clip imports, else why not: the skip reason of the tests that need it (HPSv2.1, and GenEval's
    open_clip colour classifier). CI installs ``.[diffusers,dev]`` without the ``eval`` extra: there ``torch==2.13.0``
    is a local CPU build, and the torchvision that open-clip-torch pulls from PyPI is built for the CUDA torch, so its
    C ops (``torchvision::nms``) fail to load and break transformers' imports too."""
    why = (
        "needs open_clip (extra 'eval'), not installed in CI: open-clip-torch pulls a PyPI torchvision built for "
        "the CUDA torch, whose C ops do not load against the CPU torch==2.13.0"
    )
    if importlib.util.find_spec("open_clip") is None:
        return why
    try:
        import open_clip  # noqa: F401
    except Exception as e:  # a torchvision built for another torch raises RuntimeError, not ImportError
        return f"{why} ({type(e).__name__}: {e})"
    return None


def register_tiny_hps(root: Path) -> str:
    import open_clip

    path = Path(root) / f"{HPS_ARCH}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(TINY_HPS_CONFIG)
    if not path.is_file() or path.read_text() != text:  # other processes may be reading it
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    open_clip.add_model_config(path)
    return HPS_ARCH


def build_tiny_hps(root: Path, seed: int = 0) -> Path:
    """An HPS-style checkpoint ({"state_dict": ...}) of the tiny open_clip model; returns the file."""
    import open_clip

    register_tiny_hps(root)
    torch.manual_seed(seed)
    model = open_clip.create_model(HPS_ARCH, pretrained=None)
    path = Path(root) / "hps_tiny.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def build_tiny_aesthetic_head(path: Path, dim: int = 32, seed: int = 0) -> Path:
    from soarflow.scorers import AestheticHead

    torch.manual_seed(seed)
    head = AestheticHead((dim, 64, 16, 8, 4))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(head.state_dict(), path)
    return path


def build_tiny_image_reward(seed: int = 0, tokenizer=None):
    """(BlipReward, tokenizer) at toy size: BLIP vision (32 px, patch 8) + BLIP text with cross-attention.
    (A tokenizer trained anew may order tied merges differently in another process: pass a saved one where two
    processes must agree.)"""
    from transformers import BlipTextConfig, BlipVisionConfig

    from soarflow.scorers import BlipReward

    tokenizer = tokenizer or build_clip_tokenizer()
    torch.manual_seed(seed)
    vision = BlipVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8
    )
    text = BlipTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        encoder_hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    return BlipReward.from_configs(vision, text), tokenizer


def fake_ocr_reader(image: np.ndarray) -> str:
    """Reads 'soar' from bright images, 'sxar' from mid ones and nothing from dark ones (pixel mean)."""
    m = float(image.mean())
    return "so ar" if m > 140 else ("sxar" if m > 100 else "")


def fake_detector(image: np.ndarray) -> dict:
    """Detections from the image's quadrant means: class i = COCO_CLASSES[int(quadrant mean) % 80], score from the
    mean, a box over the quadrant and its mask."""
    from soarflow.scorers.suites import COCO_CLASSES

    h, w = image.shape[:2]
    out: dict = {}
    for qy in range(2):
        for qx in range(2):
            q = image[qy * h // 2 : (qy + 1) * h // 2, qx * w // 2 : (qx + 1) * w // 2]
            m = float(q.mean())
            box = np.array([qx * w / 2, qy * h / 2, (qx + 1) * w / 2, (qy + 1) * h / 2])
            mask = np.zeros((h, w), dtype=bool)
            mask[qy * h // 2 : (qy + 1) * h // 2, qx * w // 2 : (qx + 1) * w // 2] = True
            out.setdefault(COCO_CLASSES[int(m) % 80], []).append((box, 0.3 + m / 300, mask))
    return out


def fake_colors(image: np.ndarray, objects, name: str) -> list[str]:
    from soarflow.scorers.suites import GENEVAL_COLORS

    out = []
    for box, _, _ in objects:
        x0, y0, x1, y1 = (int(v) for v in box[:4])
        out.append(GENEVAL_COLORS[int(image[y0:y1, x0:x1].reshape(-1, 3).mean(0).argmax()) * 3 % 10])
    return out


def build_standins(root: Path, device: str = "cpu") -> dict:
    """Every scorer of `soarflow eval` at toy size, through the same classes (and loaders where they are local);
    all but ``hpsv2`` where open_clip does not import (`open_clip_missing`). GenEval's colour classifier is the
    pixel-only `fake_colors`, so GenEval needs no open_clip here."""
    from soarflow.scorers import (
        AestheticScorer,
        GenEvalScorer,
        ImageRewardScorer,
        OCRScorer,
        PickScoreScorer,
        build_scorer,
    )

    root = Path(root)
    clip = root / "clip"
    if not (clip / "config.json").is_file():
        build_tiny_clip(clip)
    head = root / "aesthetic_head.pth"
    if not head.is_file():
        build_tiny_aesthetic_head(head)
    from transformers import CLIPTokenizer

    reward, tokenizer = build_tiny_image_reward(tokenizer=CLIPTokenizer.from_pretrained(clip))
    weights = root / "imagereward.pt"
    if not weights.is_file():
        tmp = root / f"imagereward.{os.getpid()}.tmp"
        torch.save(reward.state_dict(), tmp)
        os.replace(tmp, weights)
    reward.load_state_dict(torch.load(weights, weights_only=True))
    scorers = {
        "geneval": GenEvalScorer(fake_detector, fake_colors),
        "ocr": OCRScorer(fake_ocr_reader),
        "pickscore": PickScoreScorer.from_pretrained(clip, device=device),
        "clip": build_scorer("clip", path=str(clip), device=device),
        "aesthetic": AestheticScorer.from_pretrained(clip, head=head, device=device),
        "imagereward": ImageRewardScorer(reward, tokenizer, image_size=32, device=device),
    }
    if open_clip_missing() is None:
        from soarflow.scorers import HPSv2Scorer

        hps = root / "hps_tiny.pt"
        if not hps.is_file():
            build_tiny_hps(root)
        else:
            register_tiny_hps(root)
        scorers["hpsv2"] = HPSv2Scorer.from_pretrained(hps, arch=HPS_ARCH, device=device)
    return scorers
