"""Scenes of the ShapesEval world: objects placed on a canvas so that a prompt holds exactly.

Images are small RGB canvases (32x32 by default) with a dark, flat background and 1 to 4 non-overlapping
axis-aligned objects. Each object is a ``circle``, ``square`` or upright ``triangle`` of one of the palette
``COLORS``; its size, position and (slightly) hue/brightness vary.

Every random draw uses ``random.Random`` seeded by a string (hashed with SHA-512 by CPython), so the splits are
identical across machines and Python versions for the same seed; images are built as uint8 arrays.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from .grammar import BACKGROUND, COLORS, HELD_OUT_SHAPE_COLORS, PromptSpec


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


def rand_int(rng: random.Random, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] from `rng.random()` only (stable across Python versions)."""
    return lo + min(int(rng.random() * (hi - lo + 1)), hi - lo)


def rand_choice(rng: random.Random, seq: Sequence):
    return seq[rand_int(rng, 0, len(seq) - 1)]


def allowed_colors(shape: str, allow_held_out: bool) -> list[str]:
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
            size = rand_int(rng, lo, top)
            for _ in range(30):
                box = (rand_int(rng, 1, image_size - 1 - size), rand_int(rng, 1, image_size - 1 - size), size)
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
        items = [(o.shape, o.color or rand_choice(rng, allowed_colors(o.shape, allow_held_out))) for o in objs]
        placed = place_objects(rng, items, image_size, relation=spec.relation)
        if placed is not None:
            return Scene(placed, random_background(rng), image_size)
    raise RuntimeError(f"could not place the objects of {spec.text!r} on a {image_size}px canvas")


def random_background(rng: random.Random) -> tuple[int, int, int]:
    return tuple(c + rand_int(rng, -6, 6) for c in BACKGROUND)
