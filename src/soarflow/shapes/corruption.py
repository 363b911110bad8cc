"""The noise of the web-like pretraining corpus: clutter, generic, incomplete, partly wrong and prefixed captions."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .grammar import (
    COLORS,
    GENERIC_CAPTIONS,
    NUMBERS,
    PREFIXES,
    RELATIONS,
    SHAPES,
    SINGULARS,
    ObjectSpec,
    caption_held_out_combos,
)
from .scenes import Scene, allowed_colors, place_objects, rand_choice, rand_int

# Pretraining noise rates (per item) of the shipped base's corpus: see `corrupt` and `ShapesDataset`.
P_CLUTTER, P_WRONG, P_INCOMPLETE, P_GENERIC, P_PREFIX = 0.25, 0.10, 0.18, 0.04, 0.25


@dataclass(frozen=True)
class Corruption:
    """Per-item rates of the pretraining corpus's noise (defaults: the shipped base's corpus). A noisier corpus
    (more clutter, wrong and incomplete captions, as in web data) leaves more for a clean post-training to fix."""

    clutter: float = P_CLUTTER
    wrong: float = P_WRONG
    incomplete: float = P_INCOMPLETE
    generic: float = P_GENERIC
    prefix: float = P_PREFIX

    def __post_init__(self) -> None:
        for name in ("clutter", "wrong", "incomplete", "generic", "prefix"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"corruption.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.generic + self.incomplete + self.wrong > 1.0:
            raise ValueError(
                f"corruption.generic + incomplete + wrong must be <= 1 (one caption replacement per "
                f"item), got {self.generic + self.incomplete + self.wrong:g}"
            )


def mutate_word(rng: random.Random, caption: str) -> str:
    """A partly wrong caption: one color / shape / number / relation word replaced by another of its kind."""
    words = caption.split()
    slots = [i for i, w in enumerate(words) if w in COLORS or w in SHAPES or w in SINGULARS or w in NUMBERS]
    for rel in RELATIONS:
        if rel in caption:
            return caption.replace(rel, rand_choice(rng, [r for r in RELATIONS if r != rel]))
    i = rand_choice(rng, slots)
    w = words[i]
    for pool in (tuple(COLORS), SHAPES, tuple(SINGULARS), tuple(NUMBERS)):
        if w in pool:
            words[i] = rand_choice(rng, [x for x in pool if x != w])
    return " ".join(words)


def incomplete_caption(rng: random.Random, scene: Scene) -> str:
    """Describe one object of the scene, dropping its color half of the time."""
    o = rand_choice(rng, scene.objects)
    return ObjectSpec(o.shape, o.color if rng.random() < 0.5 else None).phrase()


def corrupt(rng: random.Random, scene: Scene, caption: str, rates: Corruption = Corruption()) -> tuple[Scene, str]:
    """The pretraining corpus's web-like noise on one clean (scene, caption), in this order: with p=clutter
    1-2 unmentioned objects are added; the caption is replaced with p=generic by a generic one, with
    p=incomplete by an incomplete one, with p=wrong by a partly wrong one (never naming a held-out
    combination); finally with p=prefix a prefix ("a photo of", ...) is prepended."""
    if rng.random() < rates.clutter and len(scene.objects) < 4:
        n = min(4 - len(scene.objects), rand_int(rng, 1, 2))
        items = []
        for _ in range(n):
            shape = rand_choice(rng, SHAPES)
            items.append((shape, rand_choice(rng, allowed_colors(shape, False))))
        extra = place_objects(rng, items, scene.image_size, existing=scene.objects)
        if extra is not None:
            scene = Scene(scene.objects + extra, scene.background, scene.image_size)
    u = rng.random()
    if u < rates.generic:
        caption = rand_choice(rng, GENERIC_CAPTIONS)
    elif u < rates.generic + rates.incomplete:
        caption = incomplete_caption(rng, scene)
    elif u < rates.generic + rates.incomplete + rates.wrong:
        for _ in range(10):
            wrong = mutate_word(rng, caption)
            if not caption_held_out_combos(wrong):
                caption = wrong
                break
    if rng.random() < rates.prefix and caption not in GENERIC_CAPTIONS:
        caption = f"{rand_choice(rng, PREFIXES)} {caption}"
    return scene, caption
