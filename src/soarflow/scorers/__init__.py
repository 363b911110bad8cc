"""Evaluation hook (generate -> score -> summary) and an example CLIPScore scorer loaded from a local path."""

from .base import Scorer, evaluate, task_generator
from .clip_score import CLIPScorer

__all__ = ["CLIPScorer", "Scorer", "evaluate", "task_generator"]
