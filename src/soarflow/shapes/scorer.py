r"""Deterministic ShapesEval scorer: detect objects in an image, then judge it against its prompt (GenEval-style).

Detection (no learned weights; thresholds scale with the image side S):

1. Pixel classes. With :math:`x = (img + 1)/2 \in [0,1]^3`, brightness :math:`m = \max_c x_c` and chroma
   :math:`x/m`, a pixel belongs to palette color k if its chroma is closer to the palette chroma
   :math:`P_k/\max P_k` than to any other, within 0.25 (L2), and :math:`m \ge 0.45 \max P_k` (at least 45% of the
   palette color's own brightness, i.e. about half-way between background and object for blurred edges);
   otherwise it is background.
2. Objects: 4-connected components of equal class with area >= max(10, 0.012 S^2) pixels (smaller specks are
   ignored). Centroid = mean pixel coordinate + 0.5 (x to the right, y down).
3. Shape, from the component's bounding box (w x h), fill ratio f = area / (w h) and the mean row widths of its top
   and bottom thirds relative to w (t, b) and the mean fill c of its four k x k corner blocks (k = max(2,
   round(min(w, h) / 4))): ``unknown`` if max(w, h) > 0.75 S or the aspect ratio exceeds 1.6; else ``triangle``
   if |b - t| > 0.35 and f <= 0.75; else ``square`` if f >= 0.8 and c >= 0.6; else ``circle`` if f >= 0.6;
   else ``unknown``. (Ideal values: square f=1, c=1; disc f=pi/4, t=b, c~0; triangle f=1/2, t~1/6, b~5/6.)

Judging (an object "matches" a (shape, color) if both agree; an uncolored request matches any color):

* single_object: at least one matching object;
* two_objects / color_attr: at least one match for each of the two described objects;
* counting: exactly n matching objects (extra objects of the requested kind fail);
* colors: at least one matching object;
* position: a matching pair (a, b) of distinct objects whose centroids satisfy the relation: the subject is beyond
  the other by more than 0.1 S along the relation's axis (`soarflow.shapes.scenes.relation_holds`).

Reward (partial credit in [0, 1], equal to 1 exactly when the image is judged correct): single_object 1/0;
two_objects the fraction of the two objects found; counting max(0, 1 - |k - n| / n) for k matches; colors
(shape present + shape in that color) / 2; position (subject found + object found + relation holds) / 3;
color_attr (shape 1 present + shape 2 present + shape 1 in color 1 + shape 2 in color 2) / 4.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .datasets import EvalPrompt
from .grammar import COLORS, FAMILIES, ObjectSpec, PromptSpec, parse_prompt
from .scenes import relation_holds

COLOR_NAMES = tuple(COLORS)
_PALETTE_CHROMA = torch.tensor([[c / max(rgb) for c in rgb] for rgb in COLORS.values()], dtype=torch.float32)
_PALETTE_BRIGHTNESS = torch.tensor([max(rgb) / 255 for rgb in COLORS.values()], dtype=torch.float32)
MIN_RELATIVE_BRIGHTNESS = 0.45
MAX_CHROMA_DISTANCE = 0.25


@dataclass(frozen=True)
class DetectedObject:
    shape: str  # "circle" | "square" | "triangle" | "unknown"
    color: str
    cx: float
    cy: float
    area: int
    bbox: tuple[int, int, int, int]  # x0, y0, w, h
    fill: float

    def matches(self, spec: ObjectSpec) -> bool:
        return self.shape == spec.shape and (spec.color is None or self.color == spec.color)


def validate_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Check (B, 3, H, W) float values in [-1, 1] (1e-3 tolerance); return them as float32 on the CPU."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3 or min(images.shape[2:]) < 16:
        raise ValueError(f"{name} must have shape (B, 3, H, W) with H, W >= 16, got {tuple(images.shape)}")
    images = images.detach().float().cpu()
    if images.numel() and not torch.isfinite(images).all():
        raise ValueError(f"{name} contains NaN or inf values")
    if images.numel() and (images.min() < -1.001 or images.max() > 1.001):
        raise ValueError(
            f"{name} values must lie in [-1, 1], got range [{images.min().item():.4g}, {images.max().item():.4g}]"
        )
    return images.clamp(-1, 1)


def pixel_classes(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) int64: 0 = background, k + 1 = palette color COLOR_NAMES[k] (see module doc, step 1)."""
    x = (images + 1) / 2
    m = x.amax(dim=1)
    chroma = x / m.clamp_min(1e-6).unsqueeze(1)
    # squared distances |c|^2 - 2 c.P + |P|^2 without materialising a (B, K, 3, H, W) tensor
    dist2 = (
        chroma.square().sum(1, keepdim=True)
        - 2 * torch.einsum("bchw,kc->bkhw", chroma, _PALETTE_CHROMA)
        + _PALETTE_CHROMA.square().sum(1).view(1, -1, 1, 1)
    )
    best, k = dist2.min(dim=1)
    bright = m >= MIN_RELATIVE_BRIGHTNESS * _PALETTE_BRIGHTNESS[k]
    return torch.where(bright & (best <= MAX_CHROMA_DISTANCE**2), k + 1, torch.zeros_like(k))


def connected_components(classes: torch.Tensor) -> torch.Tensor:
    """4-connected components of equal nonzero class: (B, H, W) ids (0 = background), by min-label propagation."""
    b, h, w = classes.shape
    big = h * w + 1
    fg = classes > 0
    ids = torch.where(fg, torch.arange(1, h * w + 1).view(1, h, w).expand(b, h, w), torch.full_like(classes, big))
    same_v = (classes[:, 1:] == classes[:, :-1]) & fg[:, 1:]
    same_h = (classes[:, :, 1:] == classes[:, :, :-1]) & fg[:, :, 1:]
    while True:
        new = ids.clone()
        new[:, 1:] = torch.minimum(new[:, 1:], torch.where(same_v, ids[:, :-1], big))
        new[:, :-1] = torch.minimum(new[:, :-1], torch.where(same_v, ids[:, 1:], big))
        new[:, :, 1:] = torch.minimum(new[:, :, 1:], torch.where(same_h, ids[:, :, :-1], big))
        new[:, :, :-1] = torch.minimum(new[:, :, :-1], torch.where(same_h, ids[:, :, 1:], big))
        if torch.equal(new, ids):
            break
        ids = new
    return torch.where(fg, ids, torch.zeros_like(ids))


def classify_shape(mask: np.ndarray, image_size: int) -> tuple[str, float]:
    """Shape name and fill ratio of one component given its bounding-box crop (module doc, step 3)."""
    h, w = mask.shape
    fill = float(mask.sum()) / (h * w)
    if max(h, w) > 0.75 * image_size or max(h, w) > 1.6 * min(h, w):
        return "unknown", fill
    widths = mask.sum(axis=1) / w
    third = max(1, h // 3)
    top, bottom = float(widths[:third].mean()), float(widths[-third:].mean())
    if abs(bottom - top) > 0.35 and fill <= 0.75:
        return "triangle", fill
    # Corner blocks: a square fills them, a disc leaves them (mostly) empty. At least 2 x 2, because a soft-edged
    # square (a generator's, or drawn at a sub-pixel offset) loses its single outermost corner pixels.
    k = max(2, round(min(h, w) / 4))
    corners = float(np.mean([mask[:k, :k].mean(), mask[:k, -k:].mean(), mask[-k:, :k].mean(), mask[-k:, -k:].mean()]))
    if fill >= 0.8 and corners >= 0.6:
        return "square", fill
    if fill >= 0.6:
        return "circle", fill
    return "unknown", fill


def min_object_area(image_size: int) -> int:
    return max(10, round(0.012 * image_size * image_size))


def detect(images: torch.Tensor) -> list[list[DetectedObject]]:
    """Objects found in each image of a (B, 3, H, W) batch in [-1, 1], sorted by (y, x) of their centroid."""
    images = validate_images(images)
    classes = pixel_classes(images)
    comps = connected_components(classes).numpy()
    classes = classes.numpy()
    size = min(images.shape[2:])
    min_area = min_object_area(size)
    out = []
    for ids, cls in zip(comps, classes):
        objs = []
        labels, counts = np.unique(ids[ids > 0], return_counts=True)
        for label in labels[counts >= min_area]:
            ys, xs = np.nonzero(ids == label)
            y0, x0 = ys.min(), xs.min()
            crop = ids[y0 : ys.max() + 1, x0 : xs.max() + 1] == label
            shape, fill = classify_shape(crop, size)
            objs.append(
                DetectedObject(
                    shape=shape,
                    color=COLOR_NAMES[cls[ys[0], xs[0]] - 1],
                    cx=round(float(xs.mean()) + 0.5, 3),
                    cy=round(float(ys.mean()) + 0.5, 3),
                    area=int(len(ys)),
                    bbox=(int(x0), int(y0), int(crop.shape[1]), int(crop.shape[0])),
                    fill=round(fill, 4),
                )
            )
        out.append(sorted(objs, key=lambda o: (o.cy, o.cx)))
    return out


# ------------------------------------------------------------------------------------------------ judging
def _describe(o: ObjectSpec, plural: bool = False) -> str:
    return f"{o.color + ' ' if o.color else ''}{o.shape}{'s' if plural else ''}"


def judge(spec: PromptSpec, objects: Sequence[DetectedObject], image_size: int) -> tuple[bool, float, str]:
    """(correct, reward in [0, 1], reason) for one image; rules in the module doc."""
    count = lambda o: sum(d.matches(o) for d in objects)  # noqa: E731
    has_shape = lambda o: any(d.shape == o.shape for d in objects)  # noqa: E731
    objs = spec.objects
    if spec.family == "single_object":
        ok = count(objs[0]) > 0
        return ok, float(ok), "ok" if ok else f"no {objs[0].shape} found"
    if spec.family in ("two_objects", "color_attr"):
        found = [count(o) > 0 for o in objs]
        ok = all(found)
        if spec.family == "two_objects":
            reward = sum(found) / 2
        else:
            reward = (sum(has_shape(o) for o in objs) + sum(found)) / 4
        missing = [_describe(o) for o, f in zip(objs, found) if not f]
        return ok, reward, "ok" if ok else f"missing {' and '.join(missing)}"
    if spec.family == "counting":
        k, n = count(objs[0]), spec.count
        reason = "ok" if k == n else f"found {k} {_describe(objs[0], True)}, expected {n}"
        return k == n, max(0.0, 1 - abs(k - n) / n), reason
    if spec.family == "colors":
        ok, shape_ok = count(objs[0]) > 0, has_shape(objs[0])
        if ok:
            reason = "ok"
        elif shape_ok:
            colors = sorted({d.color for d in objects if d.shape == objs[0].shape})
            reason = f"{objs[0].shape} found in {'/'.join(colors)}, expected {objs[0].color}"
        else:
            reason = f"no {objs[0].shape} found"
        return ok, (ok + shape_ok) / 2, reason
    # position
    subj = [d for d in objects if d.matches(objs[0])]
    other = [d for d in objects if d.matches(objs[1])]
    rel = any(
        a is not b and relation_holds((a.cx, a.cy), (b.cx, b.cy), spec.relation, image_size)
        for a in subj
        for b in other
    )
    reward = (bool(subj) + bool(other) + rel) / 3
    if rel:
        reason = "ok"
    elif subj and other:
        reason = f"{_describe(objs[0])} is not {spec.relation} {_describe(objs[1])}"
    else:
        reason = f"missing {' and '.join(_describe(o) for o, f in zip(objs, (subj, other)) if not f)}"
    return rel, reward, reason


# ------------------------------------------------------------------------------------------------ reports
@dataclass
class ImageScore:
    """One judged image: its prompt, whether it is correct, its reward, why, and the objects detected."""

    index: int  # row in the scored batch
    prompt: str
    family: str
    held_out: bool
    correct: bool
    reward: float
    reason: str
    objects: list[dict]
    prompt_index: int | None = None  # EvalPrompt.index when scored from a ShapesEval set


@dataclass
class ShapesReport:
    """GenEval-style results. ``overall`` is the mean of the per-family accuracies (families present only);
    ``seen`` / ``held_out`` are accuracies over the images of seen / held-out prompts (None if there are none)."""

    overall: float
    per_family: dict[str, float]
    seen: float | None
    held_out: float | None
    num_images: int
    mean_reward: float
    records: list[ImageScore] = field(default_factory=list, repr=False)

    def to_dict(self, with_records: bool = False) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "records"}
        d["num_seen"] = sum(not r.held_out for r in self.records)
        d["num_held_out"] = sum(r.held_out for r in self.records)
        if with_records:
            d["records"] = [asdict(r) for r in self.records]
        return d

    def write_jsonl(self, path: str | Path) -> Path:
        """One JSON object per image (`ImageScore` fields). Refuses to overwrite an existing file."""
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} already exists; not overwriting it")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x") as f:
            for r in self.records:
                f.write(json.dumps(asdict(r)) + "\n")
        return path

    def table(self) -> str:
        fmt = lambda v: "  -  " if v is None else f"{v:.3f}"  # noqa: E731
        counts = {f: sum(r.family == f for r in self.records) for f in self.per_family}
        lines = [f"{'family':<15}{'acc':>7}{'images':>8}", "-" * 30]
        lines += [f"{f:<15}{fmt(a):>7}{counts[f]:>8}" for f, a in self.per_family.items()]
        lines += [
            "-" * 30,
            f"{'overall':<15}{fmt(self.overall):>7}{self.num_images:>8}",
            f"{'seen':<15}{fmt(self.seen):>7}{sum(not r.held_out for r in self.records):>8}",
            f"{'held_out':<15}{fmt(self.held_out):>7}{sum(r.held_out for r in self.records):>8}",
            f"{'mean reward':<15}{fmt(self.mean_reward):>7}",
        ]
        return "\n".join(lines)


def _specs(prompts: Sequence[str | EvalPrompt], batch: int) -> list[tuple[PromptSpec, int | None]]:
    if isinstance(prompts, str):
        raise ValueError(f"prompts must be a sequence of prompts, got the single string {prompts!r}")
    if len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for {batch} images")
    out = []
    for p in prompts:
        if isinstance(p, EvalPrompt):
            out.append((parse_prompt(p.text), p.index))
        else:
            out.append((parse_prompt(p), None))
    return out


def score(images: torch.Tensor, prompts: Sequence[str | EvalPrompt]) -> ShapesReport:
    """Score (B, 3, H, W) images in [-1, 1] against their prompts (strings or `EvalPrompt`s)."""
    images = validate_images(images)
    specs = _specs(prompts, images.shape[0])
    size = min(images.shape[2:])
    records = []
    for i, ((spec, pidx), objs) in enumerate(zip(specs, detect(images))):
        ok, reward, reason = judge(spec, objs, size)
        records.append(
            ImageScore(i, spec.text, spec.family, spec.held_out, ok, reward, reason, [asdict(o) for o in objs], pidx)
        )
    acc = lambda rs: float(np.mean([r.correct for r in rs])) if rs else None  # noqa: E731
    per_family = {f: acc([r for r in records if r.family == f]) for f in FAMILIES}
    per_family = {f: a for f, a in per_family.items() if a is not None}
    return ShapesReport(
        overall=float(np.mean(list(per_family.values()))) if per_family else 0.0,
        per_family=per_family,
        seen=acc([r for r in records if not r.held_out]),
        held_out=acc([r for r in records if r.held_out]),
        num_images=len(records),
        mean_reward=float(np.mean([r.reward for r in records])) if records else 0.0,
        records=records,
    )


def reward(images: torch.Tensor, prompts: Sequence[str | EvalPrompt]) -> torch.Tensor:
    """Per-image reward in [0, 1] (partial credit, 1 iff judged correct), float32 (B,) on the images' device."""
    device = images.device if isinstance(images, torch.Tensor) else "cpu"
    rep = score(images, prompts)
    return torch.tensor([r.reward for r in rep.records], dtype=torch.float32, device=device)
