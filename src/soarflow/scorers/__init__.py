"""The paper's metrics as scorers (``scorer(images in [-1, 1], prompts) -> Tensor (B,)``), their registry
(:func:`build_scorer`), the prompt suites, and the evaluation hook (generate -> score -> summary)."""

from .aesthetic import AestheticHead, AestheticScorer
from .base import Scorer, evaluate, task_generator
from .clip_score import CLIPScorer, PickScoreScorer
from .geneval import GenEvalScorer
from .hps import HPSv2Scorer
from .image_reward import BlipReward, ImageRewardScorer
from .ocr import OCRScorer, ocr_score
from .registry import COLUMNS, SCORER_NAMES, build_scorer

__all__ = [
    "AestheticHead",
    "AestheticScorer",
    "BlipReward",
    "CLIPScorer",
    "COLUMNS",
    "GenEvalScorer",
    "HPSv2Scorer",
    "ImageRewardScorer",
    "OCRScorer",
    "PickScoreScorer",
    "SCORER_NAMES",
    "Scorer",
    "build_scorer",
    "evaluate",
    "ocr_score",
    "task_generator",
]
