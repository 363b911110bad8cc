"""`build_scorer(name, **kw) -> Scorer`: the paper's metrics by name, for `soarflow eval` and as GRPO rewards.

Every scorer is called as ``scorer(images, prompts) -> Tensor (B,)`` (float32, CPU, higher is better) with
``images`` a float tensor (B, 3, H, W) **in [-1, 1]** and ``prompts`` a list of B strings. Keywords go to the
scorer's ``from_pretrained``: ``path`` (a local folder/file or a hub id; default the paper's weights) and
``device``; ``aesthetic`` also takes ``head``, ``ocr`` ``engine``, ``geneval`` ``config``. The GenEval scorer
also takes ``metadata=`` (its lines) in its call; without it the prompt must be one of the built-in suite's.

=========== ========================================== =========================================
name        metric (paper column)                      default weights
=========== ========================================== =========================================
geneval     GenEval correct (0/1)                      Mask2Former (mmdet) + CLIP ViT-L/14
ocr         OCR accuracy in [0, 1]                     EasyOCR (or engine="paddleocr")
pickscore   PickScore (~100 x cos)                     yuvalkirstain/PickScore_v1
clip        ClipScore (cos)                            openai/clip-vit-large-patch14
hpsv2       HPSv2.1 (cos)                              xswu/HPSv2 HPS_v2.1_compressed.pt
aesthetic   LAION aesthetic v2 (1-10)                  CLIP ViT-L/14 + sac+logos+ava1-l14 head
imagereward ImageReward (standardised)                 ImageReward-v1.0 (image-reward package)
=========== ========================================== =========================================
"""

from __future__ import annotations

from typing import Any, Callable

from .aesthetic import AestheticScorer
from .base import Scorer
from .clip_score import CLIPScorer, PickScoreScorer
from .geneval import GenEvalScorer
from .hps import HPSv2Scorer
from .images import missing_package
from .image_reward import ImageRewardScorer
from .ocr import OCRScorer

# paper column order and titles
COLUMNS = {
    "geneval": "GenEval",
    "ocr": "OCR",
    "pickscore": "PickScore",
    "clip": "ClipScore",
    "hpsv2": "HPSv2.1",
    "aesthetic": "Aesthetic",
    "imagereward": "ImageReward",
}


def _clip(**kw: Any) -> CLIPScorer:
    kw.setdefault("scale", 1.0)  # the paper's column is the plain cosine
    kw.setdefault("clamp", False)
    return CLIPScorer.from_pretrained(**kw)


def _ocr(path: str | None = None, **kw: Any) -> OCRScorer:
    if path is not None:
        kw.setdefault("engine", path)
    return OCRScorer.from_pretrained(**kw)


BUILDERS: dict[str, Callable[..., Scorer]] = {
    "geneval": GenEvalScorer.from_pretrained,
    "ocr": _ocr,
    "pickscore": PickScoreScorer.from_pretrained,
    "clip": _clip,
    "hpsv2": HPSv2Scorer.from_pretrained,
    "aesthetic": AestheticScorer.from_pretrained,
    "imagereward": ImageRewardScorer.from_pretrained,
}
SCORER_NAMES = tuple(BUILDERS)


# the packages each scorer imports (checked before a long generation starts)
PACKAGES: dict[str, tuple[str, ...]] = {
    "geneval": ("mmdet", "open_clip"),
    "pickscore": ("transformers",),
    "clip": ("transformers",),
    "hpsv2": ("open_clip",),
    "aesthetic": ("transformers",),
    "imagereward": ("ImageReward",),
}
OCR_ENGINES = {"easyocr": "easyocr", "paddleocr": "paddleocr"}


def check_packages(name: str, engine: str | None = None) -> None:
    """Raise the one-line ImportError of :func:`build_scorer` if a package scorer `name` needs is missing, without
    loading any weight (``engine``: the OCR engine)."""
    import importlib.util

    if name not in BUILDERS:
        raise ValueError(f"unknown scorer {name!r}: choose one of {', '.join(SCORER_NAMES)}")
    needs = PACKAGES.get(name, ())
    if name == "ocr":
        engine = engine or "easyocr"
        if engine not in OCR_ENGINES:
            raise ValueError(f"scorer 'ocr': unknown engine {engine!r} (easyocr or paddleocr)")
        needs = (OCR_ENGINES[engine],)
    for module in needs:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise missing_package(name, module)


def build_scorer(name: str, **kw: Any) -> Scorer:
    """The scorer `name` (one of SCORER_NAMES), loaded with `kw` (``path``, ``device``, ...). A missing package
    raises ImportError and missing weights FileNotFoundError, each with a one-line message naming them."""
    if name not in BUILDERS:
        raise ValueError(f"unknown scorer {name!r}: choose one of {', '.join(SCORER_NAMES)}")
    kw = {k: v for k, v in kw.items() if v is not None}
    return BUILDERS[name](**kw)
