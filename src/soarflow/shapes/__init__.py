"""ShapesEval: an offline, exact GenEval analog for text-to-image flow models on a CPU (see docs/shapes.md).

* `grammar`: vocabulary, prompt families, parsing, held-out combinations, tokenizer;
* `scenes`: objects placed so that a prompt holds; `drawing`: scenes as images, `render` for prompts;
* `corruption`: the web-like noise of the pretraining corpus; `datasets`: training splits and the evaluation set;
* `generate`: captions -> images with a velocity model; `evaluate`: one evaluation at one sampler setting;
* `scorer`: object detection and GenEval-style judging (`score`, `reward`);
* `metrics`: Frechet distance, per-prompt diversity, exposure bias of any velocity model;
* `sheet`: PNG sample sheets (the command ``soarflow eval-shapes`` is :mod:`soarflow.commands.eval_shapes`).
"""

from .datasets import EvalPrompt, ShapesDataset, ShapesEval
from .drawing import render
from .grammar import (
    COLORS,
    FAMILIES,
    HELD_OUT_RELATIONS,
    HELD_OUT_SHAPE_COLORS,
    MAX_TOKENS,
    RELATIONS,
    SHAPES,
    VOCAB,
    ObjectSpec,
    PromptSpec,
    detokenize,
    family_prompts,
    parse_prompt,
    tokenize,
)
from .metrics import ExposureBiasReport, diversity, exposure_bias, features, frechet_distance
from .scorer import DetectedObject, ImageScore, ShapesReport, detect, reward, score
from .sheet import save_sample_sheet

__all__ = [
    "DetectedObject",
    "ExposureBiasReport",
    "ImageScore",
    "ShapesReport",
    "detect",
    "diversity",
    "exposure_bias",
    "features",
    "frechet_distance",
    "reward",
    "save_sample_sheet",
    "score",
    "COLORS",
    "FAMILIES",
    "HELD_OUT_RELATIONS",
    "HELD_OUT_SHAPE_COLORS",
    "MAX_TOKENS",
    "RELATIONS",
    "SHAPES",
    "VOCAB",
    "EvalPrompt",
    "ObjectSpec",
    "PromptSpec",
    "ShapesDataset",
    "ShapesEval",
    "detokenize",
    "family_prompts",
    "parse_prompt",
    "render",
    "tokenize",
]
