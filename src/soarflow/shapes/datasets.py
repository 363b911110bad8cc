"""The ShapesEval data: the training splits (`ShapesDataset`: curated and the noisy pretraining corpus) and the
evaluation prompt set (`ShapesEval`)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from .corruption import Corruption, corrupt
from .drawing import draw_scene, render, to_tensor
from .grammar import FAMILIES, HELD_OUT_PROMPTS, SEEN_PROMPTS
from .scenes import Scene, rand_choice, rand_int, scene_for_spec

PRETRAIN_FAMILY_WEIGHTS = {
    "single_object": 0.12,
    "two_objects": 0.12,
    "counting": 0.16,
    "colors": 0.2,
    "position": 0.2,
    "color_attr": 0.2,
}
P_DUPLICATE = 0.05  # an item repeats an earlier one


def _weighted_family(rng: random.Random, weights: dict[str, float] = PRETRAIN_FAMILY_WEIGHTS) -> str:
    u, acc = rng.random() * sum(weights.values()), 0.0
    for f, w in weights.items():
        acc += w
        if u < acc:
            return f
    return [f for f, w in weights.items() if w > 0][-1]


def check_family_weights(weights: dict[str, float] | None, name: str = "family_weights") -> dict[str, float] | None:
    """None/{} (uniform) or relative weights over a subset of FAMILIES (missing families weigh 0)."""
    if not weights:
        return None
    unknown = sorted(set(weights) - set(FAMILIES))
    if unknown:
        raise ValueError(f"{name}: unknown families {unknown}; choose from {list(FAMILIES)}")
    bad = {
        f: w
        for f, w in weights.items()
        if isinstance(w, bool) or not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0)
    }
    if bad or not sum(weights.values()) > 0:
        raise ValueError(f"{name} must be finite non-negative numbers with a positive sum, got {dict(weights)}")
    return {f: float(weights.get(f, 0.0)) for f in FAMILIES}


@dataclass(frozen=True)
class Sample:
    scene: Scene
    caption: str
    source: int  # the index this item was generated from (differs from the item's index for duplicates)


class ShapesDataset(torch.utils.data.Dataset):
    """Training splits, generated on the fly and deterministically from (split, seed, index).

    * ``curated`` (default 2,000 items): clean; a uniformly chosen family (or one drawn by ``family_weights``, to
      target what a base gets wrong), a uniformly chosen *seen* prompt of it, a scene with exactly the described
      objects and the exact caption. With ``replay_fraction`` p, a fraction p of the items (decided per index) are
      items of the pretraining corpus instead (replay against forgetting).
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

    def __init__(
        self,
        split: str = "pretrain",
        num_samples: int | None = None,
        seed: int = 0,
        image_size: int = 32,
        corruption: Corruption = Corruption(),
        family_weights: dict[str, float] | None = None,
        replay_fraction: float = 0.0,
    ):
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {self.SPLITS}, got {split!r}")
        if num_samples is not None and num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if image_size < 24:
            raise ValueError(f"image_size must be >= 24 pixels for classifiable shapes, got {image_size}")
        self.split, self.seed, self.image_size = split, int(seed), int(image_size)
        self.corruption = corruption  # noise rates of the pretrain split and of replayed items
        self.family_weights = check_family_weights(family_weights)  # the curated split's (pretrain has its own)
        if self.family_weights is not None and split != "curated":
            raise ValueError("family_weights applies to the curated split only (the pretrain corpus has its own)")
        self.num_samples = int(num_samples or self.DEFAULT_SIZES[split])
        if not 0.0 <= replay_fraction <= 1.0:
            raise ValueError(f"replay_fraction must lie in [0, 1], got {replay_fraction}")
        if replay_fraction and split != "curated":
            raise ValueError("replay_fraction applies to the curated split only")
        # Replay: that fraction of curated items are items of the pretraining corpus (same seed and corruption),
        # as post-training recipes mix pretraining data back in against forgetting.
        self.replay_fraction = float(replay_fraction)
        self._replay = ShapesDataset("pretrain", None, seed, image_size, corruption) if replay_fraction else None

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, i: int) -> random.Random:
        return random.Random(f"{self.split}:{self.seed}:{i}")

    def sample(self, i: int) -> Sample:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.split} split of {self.num_samples} items")
        if self._replay is not None:
            r = random.Random(f"replay:{self.seed}:{i}")  # its own stream: curated items stay the same items
            if r.random() < self.replay_fraction:
                return self._replay.sample(rand_int(r, 0, len(self._replay) - 1))
        source = i
        if self.split == "pretrain":
            # Duplicates point to an earlier item; follow the chain to an original.
            while source > 0 and self._rng(source).random() < P_DUPLICATE:
                source = rand_int(random.Random(f"dup:{self.split}:{self.seed}:{source}"), 0, source - 1)
        rng = self._rng(source)
        if self.split == "pretrain":
            rng.random()  # the duplicate draw
            family = _weighted_family(rng)
        elif self.family_weights is not None:
            family = _weighted_family(rng, self.family_weights)
        else:
            family = rand_choice(rng, FAMILIES)  # uniform, drawn as before weights existed (same items)
        spec = rand_choice(rng, SEEN_PROMPTS[family])
        scene = scene_for_spec(spec, rng, self.image_size, allow_held_out=False)
        caption = spec.text
        if self.split == "pretrain":
            scene, caption = corrupt(rng, scene, caption, self.corruption)
        return Sample(scene, caption, source)

    def __getitem__(self, i: int) -> dict:
        s = self.sample(int(i))
        return {"image": to_tensor(draw_scene(s.scene)), "caption": s.caption}


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
    `image_prompts()` and is saved as ``{p.index:04d}_{k}.png`` (see `soarflow.commands.eval_shapes`)."""

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
            n_held = 0 if not HELD_OUT_PROMPTS[family] else max(int(n >= 2), round(self.HELD_OUT_FRACTION * n))
            for group, k in ((SEEN_PROMPTS[family], n - n_held), (HELD_OUT_PROMPTS[family], n_held)):
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
