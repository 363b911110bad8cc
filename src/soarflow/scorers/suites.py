"""Prompt suites for `soarflow eval`: GenEval (its own metadata file, or the built-in generator), DrawBench, OCR,
PickScore-style prompt files and a user's file.

Every suite is a list of :class:`PromptRecord` (the prompt and the metadata line the suite's evaluator reads).

**GenEval** (Ghosh et al. 2023, github.com/djghosh13/geneval). ``evaluation_metadata.jsonl`` is read as given
(:func:`read_geneval_metadata`). :func:`generate_geneval` builds the same suite from its recipe: the 80 COCO class
names, 10 colours, 4 relations and counts 2-4, drawn from ``numpy.random.default_rng(43)`` in GenEval's order
(80 single objects without replacement, then 100 draws each of two objects, counting, colours, position and colour
attribution; exact duplicates dropped). That gives the published 553 prompts: single_object 80, two_object 99,
counting 80, colors 94, position 100, color_attr 100; the first lines are "a photo of a bench", "... a cow",
"... a bicycle", as in the published file.

**DrawBench** (200 prompts), the **OCR** prompt set (quoted target text, as in Flow-GRPO's text-rendering test
split) and the **PickScore** prompt set are not ours to ship and cannot be downloaded here: pass their files
(``.txt`` one prompt per line, ``.jsonl`` with a ``prompt`` key, or DrawBench's ``.csv`` with a ``Prompts``
column).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_COUNTS = {
    "single_object": 80,
    "two_object": 99,
    "counting": 80,
    "colors": 94,
    "position": 100,
    "color_attr": 100,
}

# The 80 COCO classes in COCO's category order, with GenEval's names for three of them.
COCO_CLASSES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "computer mouse",
    "tv remote",
    "computer keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
GENEVAL_RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SUITES = ("geneval", "drawbench", "ocr", "pickscore", "file")


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a suite; `metadata` is the line its evaluator reads (GenEval: tag / include / exclude)."""

    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str | None:
        return self.metadata.get("tag")


def _a(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def _plural(name: str) -> str:
    return name + ("es" if name.endswith("s") else "s")


def generate_geneval(seed: int = 43, per_tag: int = 100, classes: tuple[str, ...] = COCO_CLASSES) -> list[PromptRecord]:
    """GenEval's prompt suite from its recipe (see the module docstring); ``seed=43, per_tag=100`` is the published
    suite. Colour prompts never colour the first class ("person"): their class is drawn among the others."""
    rng = np.random.default_rng(seed)
    n = len(classes)
    person = classes.index("person")

    def not_person(draw: np.ndarray | int):  # shift a draw in [0, n-1) past "person"
        return (np.asarray(draw) + 1 + person) % n

    rows: list[dict[str, Any]] = []
    for i in rng.choice(n, size=n, replace=False):
        rows.append(
            {
                "tag": "single_object",
                "include": [{"class": classes[i], "count": 1}],
                "prompt": f"a photo of {_a(classes[i])}",
            }
        )
    for _ in range(per_tag):
        a, b = rng.choice(n, size=2, replace=False)
        rows.append(
            {
                "tag": "two_object",
                "include": [{"class": classes[a], "count": 1}, {"class": classes[b], "count": 1}],
                "prompt": f"a photo of {_a(classes[a])} and {_a(classes[b])}",
            }
        )
    for _ in range(per_tag):
        i = rng.choice(n)
        k = int(rng.integers(2, 4, endpoint=True))
        rows.append(
            {
                "tag": "counting",
                "include": [{"class": classes[i], "count": k}],
                "exclude": [{"class": classes[i], "count": k + 1}],
                "prompt": f"a photo of {NUMBER_WORDS[k]} {_plural(classes[i])}",
            }
        )
    for _ in range(per_tag):
        i = int(not_person(rng.choice(n - 1)))
        color = GENEVAL_COLORS[rng.choice(len(GENEVAL_COLORS))]
        rows.append(
            {
                "tag": "colors",
                "include": [{"class": classes[i], "count": 1, "color": color}],
                "prompt": f"a photo of {_a(color)} {classes[i]}",
            }
        )
    for _ in range(per_tag):
        a, b = rng.choice(n, size=2, replace=False)
        rel = GENEVAL_RELATIONS[rng.choice(len(GENEVAL_RELATIONS))]
        rows.append(
            {
                "tag": "position",
                "include": [{"class": classes[b], "count": 1}, {"class": classes[a], "count": 1, "position": [rel, 0]}],
                "prompt": f"a photo of {_a(classes[a])} {rel} {_a(classes[b])}",
            }
        )
    for _ in range(per_tag):
        a, b = (int(x) for x in not_person(rng.choice(n - 1, size=2, replace=False)))
        ca, cb = (GENEVAL_COLORS[c] for c in rng.choice(len(GENEVAL_COLORS), size=2, replace=False))
        rows.append(
            {
                "tag": "color_attr",
                "include": [
                    {"class": classes[a], "count": 1, "color": ca},
                    {"class": classes[b], "count": 1, "color": cb},
                ],
                "prompt": f"a photo of {_a(ca)} {classes[a]} and {_a(cb)} {classes[b]}",
            }
        )
    seen: set[str] = set()
    out = []
    for row in rows:
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(PromptRecord(row["prompt"], row))
    return out


def read_geneval_metadata(path: str | Path) -> list[PromptRecord]:
    """GenEval's ``evaluation_metadata.jsonl`` as given: one JSON object per line with a ``prompt`` key."""
    records = []
    for n, row in _jsonl_rows(path):
        if "prompt" not in row:
            raise ValueError(f"{path}:{n}: a GenEval metadata line needs a 'prompt' key")
        records.append(PromptRecord(str(row["prompt"]), row))
    return records


def _jsonl_rows(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not a JSON line ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        yield n, row


def read_prompt_file(path: str | Path) -> list[PromptRecord]:
    """A prompt file: ``.txt`` (one prompt per line, blank lines skipped), ``.jsonl`` (a ``prompt`` key per line;
    the whole line is kept as metadata, so a GenEval metadata file works too) or ``.csv`` (a ``Prompts`` or
    ``prompt`` column, as DrawBench's sheet)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_geneval_metadata(path)
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            column = next(
                (c for c in ("Prompts", "prompt", "Prompt", "prompts") if c in (reader.fieldnames or [])), None
            )
            if column is None:
                raise ValueError(f"{path}: no 'Prompts' or 'prompt' column (columns: {reader.fieldnames})")
            rows = [dict(r) for r in reader if (r.get(column) or "").strip()]
        return [PromptRecord(r[column].strip(), {k: v for k, v in r.items() if k != column}) for r in rows]
    records = [PromptRecord(line.strip()) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path}: no prompt in the file")
    return records


def load_suite(name: str, path: str | Path | None = None) -> list[PromptRecord]:
    """The prompts of suite `name` (one of SUITES). GenEval without a path is the built-in generator; every other
    suite needs its file."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}: choose one of {', '.join(SUITES)}")
    if name == "geneval":
        records = read_geneval_metadata(path) if path else generate_geneval()
        missing = [r.prompt for r in records if r.tag is None]
        if missing:
            raise ValueError(f"{path}: GenEval lines need a 'tag' (first without: {missing[0]!r})")
        return records
    if path is None:
        raise ValueError(
            f"suite {name!r} is not shipped with soarflow (its prompts are not ours to redistribute): "
            f"pass its prompt file with --prompts_file"
        )
    records = read_prompt_file(path)
    if name == "ocr":
        unquoted = [r.prompt for r in records if r.prompt.count('"') < 2]
        if unquoted:
            raise ValueError(f"{path}: OCR prompts put the text to render in double quotes; {unquoted[0]!r} has none")
    return records
