r"""The ShapesEval caption grammar: vocabulary, prompt families, parsing, held-out combinations, tokenizer.

Grammar (the evaluation prompts and the curated split use exactly these six families):

==============  ==================================================  ======================================
family          template                                            example
==============  ==================================================  ======================================
single_object   ``a {shape}``                                       a circle
two_objects     ``a {shape} and a {shape'}`` (shape != shape')      a square and a triangle
counting        ``{two|three|four} [{color}] {shape}s``             three yellow circles
colors          ``a {color} {shape}``                               a magenta triangle
position        ``a {color} {shape} {relation} a {color'} {shape'}``  a red circle to the left of a blue square
color_attr      ``a {color} {shape} and a {color'} {shape'}``       a green circle and a red square
==============  ==================================================  ======================================

with relations ``to the left of``, ``to the right of``, ``above``, ``below`` (about object centroids).

Held-out combinations (never drawn or captioned in the training splits, marked in the evaluation set):
``HELD_OUT_SHAPE_COLORS`` (no object of that shape ever has that color in a training image or caption) and
``HELD_OUT_RELATIONS`` (no training caption states that relation between those two shapes, nor its converse;
the images may of course contain such arrangements without saying so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
SINGULARS = {p: s for s, p in PLURALS.items()}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 100, 245),
    "yellow": (235, 220, 40),
    "magenta": (225, 50, 225),
    "cyan": (40, 215, 230),
    "white": (235, 235, 235),
}
BACKGROUND = (18, 18, 26)
NUMBERS = {"two": 2, "three": 3, "four": 4}
NUMBER_WORDS = {v: k for k, v in NUMBERS.items()}
RELATIONS = ("to the left of", "to the right of", "above", "below")
CONVERSE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
FAMILIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")

HELD_OUT_SHAPE_COLORS = frozenset({("circle", "cyan"), ("square", "yellow"), ("triangle", "magenta")})
_HELD_OUT_RELATION_BASE = (("circle", "above", "square"), ("triangle", "to the left of", "circle"))
HELD_OUT_RELATIONS = frozenset(
    list(_HELD_OUT_RELATION_BASE) + [(b, CONVERSE[r], a) for a, r, b in _HELD_OUT_RELATION_BASE]
)

# Web-like variations that only the noisy pretraining corpus uses.
PREFIXES = ("a photo of", "a picture of", "an image of")
GENERIC_CAPTIONS = ("shapes", "some shapes", "colorful shapes", "shapes on a dark background", "an image")

_WORDS = {"a", "an", "and", "of", "photo", "picture", "image", "some", "colorful", "on", "dark", "background"}
_WORDS |= {"shapes"} | set(SHAPES) | set(PLURALS.values()) | set(COLORS) | set(NUMBERS)
_WORDS |= {w for r in RELATIONS for w in r.split()}
VOCAB: tuple[str, ...] = ("<pad>",) + tuple(sorted(_WORDS))
WORD_TO_ID = {w: i for i, w in enumerate(VOCAB)}
# Longest caption: prefix (3 words) + a position caption (10 words) = 13; 16 leaves room and stays fixed.
MAX_TOKENS = 16


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    color: str | None = None

    def phrase(self) -> str:
        return f"a {self.color} {self.shape}" if self.color else f"a {self.shape}"


@dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt. ``objects`` are the described objects (one for counting, with ``count``);
    ``relation`` links ``objects[0]`` (subject) to ``objects[1]`` in the position family."""

    family: str
    objects: tuple[ObjectSpec, ...]
    count: int | None = None
    relation: str | None = None

    @property
    def text(self) -> str:
        o = self.objects
        if self.family in ("single_object", "colors"):
            return o[0].phrase()
        if self.family in ("two_objects", "color_attr"):
            return f"{o[0].phrase()} and {o[1].phrase()}"
        if self.family == "counting":
            color = f"{o[0].color} " if o[0].color else ""
            return f"{NUMBER_WORDS[self.count]} {color}{PLURALS[o[0].shape]}"
        return f"{o[0].phrase()} {self.relation} {o[1].phrase()}"

    @property
    def held_out(self) -> bool:
        """True if the prompt names a held-out (shape, color) or (shape, relation, shape) combination."""
        if any((o.shape, o.color) in HELD_OUT_SHAPE_COLORS for o in self.objects):
            return True
        return self.relation is not None and (self.objects[0].shape, self.relation, self.objects[1].shape) in (
            HELD_OUT_RELATIONS
        )


def _parse_object(words: list[str], colored: bool) -> ObjectSpec | None:
    if colored and len(words) == 3 and words[0] == "a" and words[1] in COLORS and words[2] in SHAPES:
        return ObjectSpec(words[2], words[1])
    if not colored and len(words) == 2 and words[0] == "a" and words[1] in SHAPES:
        return ObjectSpec(words[1])
    return None


def _parse(words: list[str]) -> PromptSpec | None:
    n = len(words)
    if n in (2, 3) and (obj := _parse_object(words, colored=n == 3)):
        return PromptSpec("colors" if n == 3 else "single_object", (obj,))
    if n in (2, 3) and words[0] in NUMBERS and words[-1] in SINGULARS and (n == 2 or words[1] in COLORS):
        color = words[1] if n == 3 else None
        return PromptSpec("counting", (ObjectSpec(SINGULARS[words[-1]], color),), count=NUMBERS[words[0]])
    if n in (5, 7) and words[n // 2] == "and":
        colored = n == 7
        a, b = _parse_object(words[: n // 2], colored), _parse_object(words[n // 2 + 1 :], colored)
        if a and b and (a.shape != b.shape if not colored else a != b):
            return PromptSpec("color_attr" if colored else "two_objects", (a, b))
        return None
    for rel in RELATIONS:
        r = rel.split()
        if n == 6 + len(r) and words[3 : 3 + len(r)] == r:
            a, b = _parse_object(words[:3], True), _parse_object(words[3 + len(r) :], True)
            if a and b and a != b:
                return PromptSpec("position", (a, b), relation=rel)
    return None


def parse_prompt(text: str) -> PromptSpec:
    """Parse an evaluation-grammar prompt (see the module doc); ValueError naming the prompt otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"prompt must be a string, got {type(text).__name__}: {text!r}")
    spec = _parse(text.strip().split())
    if spec is None:
        raise ValueError(f"prompt {text!r} is not in the ShapesEval grammar (families: {', '.join(FAMILIES)})")
    return spec


def family_prompts(family: str) -> list[PromptSpec]:
    """Every prompt of a family in a fixed order (held-out ones included)."""
    objs = [ObjectSpec(s) for s in SHAPES]
    cobjs = [ObjectSpec(s, c) for c in COLORS for s in SHAPES]
    if family == "single_object":
        return [PromptSpec(family, (o,)) for o in objs]
    if family == "two_objects":
        return [PromptSpec(family, (a, b)) for a in objs for b in objs if a != b]
    if family == "counting":
        return [PromptSpec(family, (o,), count=n) for n in NUMBERS.values() for o in objs + cobjs]
    if family == "colors":
        return [PromptSpec(family, (o,)) for o in cobjs]
    if family == "position":
        return [PromptSpec(family, (a, b), relation=r) for r in RELATIONS for a in cobjs for b in cobjs if a != b]
    if family == "color_attr":
        return [PromptSpec(family, (a, b)) for a in cobjs for b in cobjs if a.shape != b.shape and a.color != b.color]
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


SEEN_PROMPTS = {f: [p for p in family_prompts(f) if not p.held_out] for f in FAMILIES}
HELD_OUT_PROMPTS = {f: [p for p in family_prompts(f) if p.held_out] for f in FAMILIES}


def caption_held_out_combos(caption: str) -> list[tuple]:
    """Held-out combinations a free-form caption mentions: adjacent ``color shape(s)`` word pairs in
    ``HELD_OUT_SHAPE_COLORS`` and ``(shape, relation, shape)`` in ``HELD_OUT_RELATIONS`` (nearest shape words
    before and after the relation phrase). Used to keep them out of the training splits, and by the tests."""
    words = caption.split()
    found: list[tuple] = []
    shape_of = lambda w: SINGULARS.get(w, w if w in SHAPES else None)  # noqa: E731
    for w1, w2 in zip(words, words[1:]):
        if w1 in COLORS and shape_of(w2) and (shape_of(w2), w1) in HELD_OUT_SHAPE_COLORS:
            found.append((shape_of(w2), w1))
    for rel in RELATIONS:
        r = rel.split()
        for i in range(len(words) - len(r) + 1):
            if words[i : i + len(r)] != r:
                continue
            before = [shape_of(w) for w in words[:i] if shape_of(w)]
            after = [shape_of(w) for w in words[i + len(r) :] if shape_of(w)]
            if before and after and (before[-1], rel, after[0]) in HELD_OUT_RELATIONS:
                found.append((before[-1], rel, after[0]))
    return found


def tokenize(captions: Sequence[str], max_len: int = MAX_TOKENS) -> torch.LongTensor:
    """Word-level token ids, shape (B, max_len), 0-padded (``VOCAB[0] == "<pad>"``).

    ValueError naming the caption and word for an unknown word, or the caption if it is longer than max_len."""
    if isinstance(captions, str):
        raise ValueError(f"tokenize expects a sequence of captions, got the single string {captions!r}")
    out = torch.zeros(len(captions), max_len, dtype=torch.long)
    for b, caption in enumerate(captions):
        words = caption.split()
        if len(words) > max_len:
            raise ValueError(f"caption {caption!r} has {len(words)} words, more than max_len={max_len}")
        for j, w in enumerate(words):
            if w not in WORD_TO_ID or w == "<pad>":
                raise ValueError(f"caption {caption!r}: word {w!r} is not in the ShapesEval vocabulary")
            out[b, j] = WORD_TO_ID[w]
    return out


def detokenize(ids: torch.Tensor) -> list[str]:
    """Inverse of `tokenize` (padding dropped)."""
    return [" ".join(VOCAB[i] for i in row.tolist() if i != 0) for row in ids]
