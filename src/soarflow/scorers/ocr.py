r"""OCR accuracy for text-rendering prompts, the metric the SOAR release takes from DiffusionNFT / Flow-GRPO
(``flow_grpo/ocr.py``): the target t is the text between the first pair of double quotes of the prompt, r the
recognised text; both lower-cased with spaces removed; then

.. math:: \mathrm{OCR}(r, t) = 1 - \min(d, |t|) / |t|, \qquad
   d = \begin{cases} 0 & t \text{ is a substring of } r \\ \mathrm{Levenshtein}(r, t) & \text{otherwise,}\end{cases}

so the score is in [0, 1]; an image where nothing is read scores 0. Flow-GRPO reads the text with PaddleOCR
(``PaddleOCR(use_angle_cls=False, lang="en")``, lines joined, each line kept when its confidence > 0); soarflow
accepts PaddleOCR or EasyOCR (``pip install easyocr``), or any reader ``reader(uint8 HxWx3 array) -> str``.
Numbers depend on the OCR engine: compare models with the same one.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from .images import check_batch, missing_package, to_uint8

Reader = Callable[[np.ndarray], str]


def target_text(prompt: str) -> str:
    """The text between the first pair of double quotes."""
    parts = prompt.split('"')
    if len(parts) < 3:
        raise ValueError(f"OCR prompt without a quoted target text: {prompt!r}")
    return parts[1]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_score(recognised: str, target: str) -> float:
    """1 - min(d, |t|)/|t| after lower-casing and removing spaces (module docstring); an empty target scores 1
    when nothing is read and 0 otherwise."""
    r = recognised.replace(" ", "").lower()
    t = target.replace(" ", "").lower()
    if not t:
        return float(not r)
    d = 0 if t in r else min(levenshtein(r, t), len(t))
    return 1.0 - d / len(t)


def easyocr_reader(reader: Any) -> Reader:
    """An ``easyocr.Reader``: ``readtext`` gives (box, text, confidence) per line."""
    return lambda image: "".join(text for _, text, conf in reader.readtext(image) if conf > 0)


def paddleocr_reader(ocr: Any) -> Reader:
    """A ``paddleocr.PaddleOCR``: ``ocr(img, cls=False)[0]`` is a list of (box, (text, confidence)) or None."""

    def read(image: np.ndarray) -> str:
        result = ocr.ocr(image, cls=False)
        lines = result[0] if result else None
        return "".join(text for _, (text, conf) in (lines or []) if conf > 0)

    return read


class OCRScorer:
    name = "ocr"

    def __init__(self, reader: Reader):
        self.reader = reader

    @classmethod
    def from_pretrained(cls, engine: str = "easyocr", device: torch.device | str = "cpu", **kw) -> "OCRScorer":
        """`engine`: easyocr (its weights download on first use) or paddleocr (Flow-GRPO's)."""
        gpu = torch.device(device).type == "cuda"
        if engine == "easyocr":
            try:
                import easyocr
            except ImportError:
                raise missing_package(cls.name, "easyocr") from None
            return cls(easyocr_reader(easyocr.Reader(["en"], gpu=gpu, verbose=False)))
        if engine == "paddleocr":
            try:
                from paddleocr import PaddleOCR
            except ImportError:
                raise missing_package(cls.name, "paddleocr") from None
            return cls(paddleocr_reader(PaddleOCR(use_angle_cls=False, lang="en", use_gpu=gpu, show_log=False)))
        raise ValueError(f"scorer 'ocr': unknown engine {engine!r} (easyocr or paddleocr)")

    def read(self, images: torch.Tensor) -> list[str]:
        return [self.reader(image) for image in to_uint8(images)]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_batch("OCRScorer", images, prompts)
        targets = [target_text(p) for p in prompts]
        scores = []
        for text, target in zip(self.read(images), targets):
            scores.append(ocr_score(text, target))
        return torch.tensor(scores, dtype=torch.float32)
