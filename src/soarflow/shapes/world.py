r"""The ShapesEval world: a procedural text-to-image world with a GenEval-like caption grammar.

Images are small RGB canvases (32x32 by default) with a dark, flat background and 1 to 4 non-overlapping
axis-aligned objects. Each object is a ``circle``, ``square`` or upright ``triangle`` of one of the palette
``COLORS``; its size, position and (slightly) hue/brightness vary.

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

Every random draw uses ``random.Random`` seeded by a string (hashed with SHA-512 by CPython), so the splits are
identical across machines and Python versions for the same seed; images are built as uint8 arrays.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
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


# ----------------------------------------------------------------------------------------------- prompts
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
        return [
            PromptSpec(family, (a, b)) for a in cobjs for b in cobjs if a.shape != b.shape and a.color != b.color
        ]
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


_SEEN = {f: [p for p in family_prompts(f) if not p.held_out] for f in FAMILIES}
_HELD = {f: [p for p in family_prompts(f) if p.held_out] for f in FAMILIES}


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


# --------------------------------------------------------------------------------------------- tokenizer
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


# ------------------------------------------------------------------------------------------------ scenes
@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    x0: int  # top-left corner of the (size x size) bounding box, in pixels
    y0: int
    size: int
    rgb: tuple[int, int, int]

    @property
    def cx(self) -> float:
        return self.x0 + self.size / 2

    @property
    def cy(self) -> float:
        return self.y0 + self.size / 2


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]
    image_size: int


def _randint(rng: random.Random, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] from `rng.random()` only (stable across Python versions)."""
    return lo + min(int(rng.random() * (hi - lo + 1)), hi - lo)


def _choice(rng: random.Random, seq: Sequence):
    return seq[_randint(rng, 0, len(seq) - 1)]


def _allowed_colors(shape: str, allow_held_out: bool) -> list[str]:
    return [c for c in COLORS if allow_held_out or (shape, c) not in HELD_OUT_SHAPE_COLORS]


def size_range(image_size: int, num_objects: int) -> tuple[int, int]:
    """Object side lengths (pixels): at least max(8, 0.25 S) so shapes stay classifiable at 32 px."""
    lo = max(8, round(0.25 * image_size))
    hi = round({1: 0.45, 2: 0.38, 3: 0.32}.get(num_objects, 0.30) * image_size)
    return lo, max(lo, hi)


def relation_holds(a: SceneObject | tuple, b: SceneObject | tuple, relation: str, image_size: int) -> bool:
    """Judging rule (also used by the scorer on centroids): the subject's centroid is beyond the other's by more
    than 0.1 * image_size along the relation's axis; the other axis is not constrained (as in GenEval)."""
    ax, ay = (a.cx, a.cy) if isinstance(a, SceneObject) else a
    bx, by = (b.cx, b.cy) if isinstance(b, SceneObject) else b
    m = 0.1 * image_size
    return {
        "to the left of": bx - ax > m,
        "to the right of": ax - bx > m,
        "above": by - ay > m,
        "below": ay - by > m,
    }[relation]


def _clear_relation(a: SceneObject, b: SceneObject, relation: str, image_size: int) -> bool:
    """Rendering rule, stricter than judging: offset >= 0.25 S along the axis and at most half that across."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    along, across = {"to the left of": (dx, dy), "to the right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[
        relation
    ]
    return along >= 0.25 * image_size and abs(across) <= 0.5 * along


def _jitter_rgb(rng: random.Random, color: str) -> tuple[int, int, int]:
    bright = 0.82 + 0.18 * rng.random()
    return tuple(int(min(255, max(0, round((c + 24 * rng.random() - 12) * bright)))) for c in COLORS[color])


def _boxes_apart(a: tuple[int, int, int], b: tuple[int, int, int], gap: int = 2) -> bool:
    (ax, ay, asz), (bx, by, bsz) = a, b
    return ax + asz + gap <= bx or bx + bsz + gap <= ax or ay + asz + gap <= by or by + bsz + gap <= ay


def place_objects(
    rng: random.Random,
    items: Sequence[tuple[str, str]],
    image_size: int,
    relation: str | None = None,
    existing: Sequence[SceneObject] = (),
) -> tuple[SceneObject, ...] | None:
    """Place (shape, color) items without overlap (bounding boxes >= 2 px apart, 1 px from the border), next to
    `existing` objects. With `relation`, items[0] must clearly stand in it to items[1]. None if it fails."""
    lo, hi = size_range(image_size, len(items) + len(existing))
    for attempt in range(60):
        top = max(lo, hi - attempt // 10)  # shrink the largest size if the canvas is crowded
        boxes = [(o.x0, o.y0, o.size) for o in existing]
        placed: list[SceneObject] = []
        for shape, color in items:
            size = _randint(rng, lo, top)
            for _ in range(30):
                box = (_randint(rng, 1, image_size - 1 - size), _randint(rng, 1, image_size - 1 - size), size)
                if all(_boxes_apart(box, other) for other in boxes):
                    break
            else:
                break
            boxes.append(box)
            placed.append(SceneObject(shape, color, box[0], box[1], size, _jitter_rgb(rng, color)))
        if len(placed) == len(items) and (
            relation is None or _clear_relation(placed[0], placed[1], relation, image_size)
        ):
            return tuple(placed)
    return None


def scene_for_spec(spec: PromptSpec, rng: random.Random, image_size: int = 32, allow_held_out: bool = True) -> Scene:
    """A scene that exactly satisfies `spec` (no other objects); uncolored objects get random colors."""
    objs = spec.objects * (spec.count or 1)
    for _ in range(100):
        items = [(o.shape, o.color or _choice(rng, _allowed_colors(o.shape, allow_held_out))) for o in objs]
        placed = place_objects(rng, items, image_size, relation=spec.relation)
        if placed is not None:
            return Scene(placed, _background(rng), image_size)
    raise RuntimeError(f"could not place the objects of {spec.text!r} on a {image_size}px canvas")


def _background(rng: random.Random) -> tuple[int, int, int]:
    return tuple(c + _randint(rng, -6, 6) for c in BACKGROUND)


def draw_scene(scene: Scene) -> np.ndarray:
    """uint8 image (H, W, 3). Pixels are filled where their centre lies inside the shape."""
    s = scene.image_size
    img = np.empty((s, s, 3), dtype=np.uint8)
    img[:] = scene.background
    for o in scene.objects:
        n = o.size
        c = (np.arange(n) + 0.5) - n / 2  # pixel-centre offsets from the box centre
        if o.shape == "square":
            mask = np.ones((n, n), dtype=bool)
        elif o.shape == "circle":
            mask = c[:, None] ** 2 + c[None, :] ** 2 <= (n / 2) ** 2
        else:  # upright isosceles triangle: apex at the top centre, base = bottom edge
            half_width = (np.arange(n) + 0.5) / 2
            mask = np.abs(c[None, :]) <= half_width[:, None]
        img[o.y0 : o.y0 + n, o.x0 : o.x0 + n][mask] = o.rgb
    return img


def draw_scene_antialiased(scene: Scene, rng: random.Random, factor: int = 4, max_shift: float = 0.5) -> np.ndarray:
    """uint8 image (H, W, 3) with soft edges, like a generator's: each object is moved by a random sub-pixel
    offset in [-max_shift, max_shift) px (in steps of 1/factor), drawn at `factor` x resolution with the
    pixel-centre rule and box-filtered back down. Tests the scorer on the edges that generated images have."""
    s, f = scene.image_size, factor
    big = []
    for o in scene.objects:
        dx, dy = (round((rng.random() * 2 - 1) * max_shift * f) for _ in range(2))
        x0 = min(max(o.x0 * f + dx, 0), (s - o.size) * f)
        y0 = min(max(o.y0 * f + dy, 0), (s - o.size) * f)
        big.append(SceneObject(o.shape, o.color, x0, y0, o.size * f, o.rgb))
    hi = draw_scene(Scene(tuple(big), scene.background, s * f)).astype(np.float64)
    return np.round(hi.reshape(s, f, s, f, 3).mean(axis=(1, 3))).astype(np.uint8)


def to_tensor(images_uint8: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) or (H, W, 3) uint8 -> float32 (B, 3, H, W) / (3, H, W) in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(images_uint8)).float().div(127.5).sub(1.0)
    return t.permute(0, 3, 1, 2).contiguous() if t.ndim == 4 else t.permute(2, 0, 1).contiguous()


def render(prompts: Sequence[str], seed: int = 0, size: int = 32) -> torch.Tensor:
    """Real images for evaluation-grammar prompts: (B, 3, size, size) float32 in [-1, 1].

    Image b depends only on (prompts[b], b, seed, size). Held-out combinations are allowed here."""
    if isinstance(prompts, str):
        raise ValueError(f"render expects a sequence of prompts, got the single string {prompts!r}")
    if size < 24:
        raise ValueError(f"size must be >= 24 pixels for classifiable shapes, got {size}")
    imgs = np.empty((len(prompts), size, size, 3), dtype=np.uint8)
    for b, p in enumerate(prompts):
        spec = parse_prompt(p)
        rng = random.Random(f"render:{seed}:{b}:{spec.text}")
        imgs[b] = draw_scene(scene_for_spec(spec, rng, size, allow_held_out=True))
    return to_tensor(imgs)


# ------------------------------------------------------------------------------------------------ splits
PRETRAIN_FAMILY_WEIGHTS = {
    "single_object": 0.12,
    "two_objects": 0.12,
    "counting": 0.16,
    "colors": 0.2,
    "position": 0.2,
    "color_attr": 0.2,
}
# Pretraining noise rates (per item): see `ShapesDataset`.
P_DUPLICATE, P_CLUTTER, P_WRONG, P_INCOMPLETE, P_GENERIC, P_PREFIX = 0.05, 0.25, 0.10, 0.18, 0.04, 0.25


def _weighted_family(rng: random.Random) -> str:
    u, acc = rng.random(), 0.0
    for f, w in PRETRAIN_FAMILY_WEIGHTS.items():
        acc += w
        if u < acc:
            return f
    return FAMILIES[-1]


def _mutate_word(rng: random.Random, caption: str) -> str:
    """A partly wrong caption: one color / shape / number / relation word replaced by another of its kind."""
    words = caption.split()
    slots = [i for i, w in enumerate(words) if w in COLORS or w in SHAPES or w in SINGULARS or w in NUMBERS]
    for rel in RELATIONS:
        if rel in caption:
            return caption.replace(rel, _choice(rng, [r for r in RELATIONS if r != rel]))
    i = _choice(rng, slots)
    w = words[i]
    for pool in (tuple(COLORS), SHAPES, tuple(SINGULARS), tuple(NUMBERS)):
        if w in pool:
            words[i] = _choice(rng, [x for x in pool if x != w])
    return " ".join(words)


def _incomplete_caption(rng: random.Random, scene: Scene) -> str:
    """Describe one object of the scene, dropping its color half of the time."""
    o = _choice(rng, scene.objects)
    return ObjectSpec(o.shape, o.color if rng.random() < 0.5 else None).phrase()


@dataclass(frozen=True)
class Sample:
    scene: Scene
    caption: str
    source: int  # the index this item was generated from (differs from the item's index for duplicates)


class ShapesDataset(torch.utils.data.Dataset):
    """Training splits, generated on the fly and deterministically from (split, seed, index).

    * ``curated`` (default 2,000 items): clean; a uniformly chosen family, a uniformly chosen *seen* prompt of it,
      a scene with exactly the described objects and the exact caption.
    * ``pretrain`` (default 200,000 items): broad and noisy like web data. Per item, independently:
      with p=0.05 it duplicates an earlier item; otherwise a family (weights ``PRETRAIN_FAMILY_WEIGHTS``) and a
      seen prompt are drawn and rendered, then with p=0.25 1-2 unmentioned clutter objects are added; the caption
      is replaced with p=0.04 by a generic one ("some shapes"), with p=0.18 by an incomplete one (one of the
      objects, color dropped half of the time), with p=0.10 by a partly wrong one (one color/shape/number/relation
      word swapped); finally with p=0.25 a prefix ("a photo of", ...) is prepended.

    Held-out combinations never occur: objects are never drawn in a held-out (shape, color) and captions that
    would mention one (after a swap) are redrawn. Items are ``{"image": (3, S, S) float in [-1, 1],
    "caption": str}``; ``sample(i)`` also gives the scene."""

    SPLITS = ("pretrain", "curated")
    DEFAULT_SIZES = {"pretrain": 200_000, "curated": 2_000}

    def __init__(self, split: str = "pretrain", num_samples: int | None = None, seed: int = 0, image_size: int = 32):
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {self.SPLITS}, got {split!r}")
        if num_samples is not None and num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if image_size < 24:
            raise ValueError(f"image_size must be >= 24 pixels for classifiable shapes, got {image_size}")
        self.split, self.seed, self.image_size = split, int(seed), int(image_size)
        self.num_samples = int(num_samples or self.DEFAULT_SIZES[split])

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, i: int) -> random.Random:
        return random.Random(f"{self.split}:{self.seed}:{i}")

    def sample(self, i: int) -> Sample:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.split} split of {self.num_samples} items")
        source = i
        if self.split == "pretrain":
            # Duplicates point to an earlier item; follow the chain to an original.
            while source > 0 and self._rng(source).random() < P_DUPLICATE:
                source = _randint(random.Random(f"dup:{self.split}:{self.seed}:{source}"), 0, source - 1)
        rng = self._rng(source)
        if self.split == "pretrain":
            rng.random()  # the duplicate draw
            family = _weighted_family(rng)
        else:
            family = _choice(rng, FAMILIES)
        spec = _choice(rng, _SEEN[family])
        scene = scene_for_spec(spec, rng, self.image_size, allow_held_out=False)
        caption = spec.text
        if self.split == "pretrain":
            scene, caption = self._corrupt(rng, scene, caption)
        return Sample(scene, caption, source)

    def _corrupt(self, rng: random.Random, scene: Scene, caption: str) -> tuple[Scene, str]:
        if rng.random() < P_CLUTTER and len(scene.objects) < 4:
            n = min(4 - len(scene.objects), _randint(rng, 1, 2))
            items = []
            for _ in range(n):
                shape = _choice(rng, SHAPES)
                items.append((shape, _choice(rng, _allowed_colors(shape, False))))
            extra = place_objects(rng, items, self.image_size, existing=scene.objects)
            if extra is not None:
                scene = Scene(scene.objects + extra, scene.background, scene.image_size)
        u = rng.random()
        if u < P_GENERIC:
            caption = _choice(rng, GENERIC_CAPTIONS)
        elif u < P_GENERIC + P_INCOMPLETE:
            caption = _incomplete_caption(rng, scene)
        elif u < P_GENERIC + P_INCOMPLETE + P_WRONG:
            for _ in range(10):
                wrong = _mutate_word(rng, caption)
                if not caption_held_out_combos(wrong):
                    caption = wrong
                    break
        if rng.random() < P_PREFIX and caption not in GENERIC_CAPTIONS:
            caption = f"{_choice(rng, PREFIXES)} {caption}"
        return scene, caption

    def __getitem__(self, i: int) -> dict:
        s = self.sample(int(i))
        return {"image": to_tensor(draw_scene(s.scene)), "caption": s.caption}


# -------------------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class EvalPrompt:
    index: int
    text: str
    family: str
    held_out: bool


class ShapesEval:
    """The evaluation prompt set: ``prompts_per_family`` prompts for each family (family-major order).

    In families that have held-out prompts (counting, colors, position, color_attr), round(0.3 * n) of the n
    prompts are held out (at least 1 when n >= 2) and the rest seen; each group is a seeded shuffle of all the
    family's prompts of that kind, cycled if more are requested than exist (single_object has 3, two_objects 6).
    Images: ``images_per_prompt`` per prompt; image k of prompt p is row ``p.index * images_per_prompt + k`` of
    `image_prompts()` and is saved as ``{p.index:04d}_{k}.png`` (see `soarflow.shapes.cli`)."""

    HELD_OUT_FRACTION = 0.3

    def __init__(self, prompts_per_family: int = 10, images_per_prompt: int = 4, seed: int = 0):
        if prompts_per_family < 1 or images_per_prompt < 1:
            raise ValueError(
                f"prompts_per_family and images_per_prompt must be >= 1, got {prompts_per_family}, {images_per_prompt}"
            )
        self.prompts_per_family, self.images_per_prompt, self.seed = prompts_per_family, images_per_prompt, seed
        self.prompts: list[EvalPrompt] = []
        for family in FAMILIES:
            rng = random.Random(f"eval:{seed}:{family}")
            n = prompts_per_family
            n_held = 0 if not _HELD[family] else max(int(n >= 2), round(self.HELD_OUT_FRACTION * n))
            for group, k in ((_SEEN[family], n - n_held), (_HELD[family], n_held)):
                order = list(group)
                rng.shuffle(order)
                for j in range(k):
                    spec = order[j % len(order)]
                    self.prompts.append(EvalPrompt(len(self.prompts), spec.text, family, spec.held_out))

    def __len__(self) -> int:
        return len(self.prompts)

    def image_prompts(self) -> list[str]:
        """Prompt text for every evaluation image, prompt-major (length len(prompts) * images_per_prompt)."""
        return [p.text for p in self.prompts for _ in range(self.images_per_prompt)]

    def render_real(self, size: int = 32) -> torch.Tensor:
        """Real images for every evaluation image (`render` of `image_prompts()` with this set's seed)."""
        return render(self.image_prompts(), seed=self.seed, size=size)
