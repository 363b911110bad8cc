"""Prompt-only datasets, for methods that generate their own images (GRPO): a prompt file, no images.

* ``.txt``: one prompt per line; blank lines are skipped.
* ``.jsonl``: one JSON object per line with a ``prompt`` key (other keys, e.g. GenEval's ``tag``, are ignored);
  blank lines are skipped.

A line that is not valid JSON, has no non-empty ``prompt`` string, or an empty file is an error that names the
file and line. Items are ``{"caption": str, "key": str, "metadata": dict | None}`` (a .jsonl line's whole object,
e.g. GenEval's ``include`` clauses that its scorer needs; None for .txt); :func:`collate_prompts` batches them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

PROMPT_SUFFIXES = (".txt", ".jsonl")


def read_prompt_records(path: str | Path, key: str = "prompt") -> list[tuple[str, dict | None]]:
    """``(prompt, metadata)`` per prompt of a ``.txt`` (metadata None) or ``.jsonl`` (the line's object) file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {p} does not exist")
    if p.suffix not in PROMPT_SUFFIXES:
        raise ValueError(
            f"prompt file {p}: expected a .txt (one prompt per line) or .jsonl (a {key!r} key per line) "
            f"file, got suffix {p.suffix!r}"
        )
    records: list[tuple[str, dict | None]] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if p.suffix == ".txt":
            records.append((line.strip(), None))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"prompt file {p}, line {n}: not valid JSON ({err.msg})") from None
        value = obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"prompt file {p}, line {n}: expected an object with a non-empty {key!r} string")
        records.append((value.strip(), obj))
    if not records:
        raise ValueError(f"prompt file {p} holds no prompts")
    return records


def read_prompt_file(path: str | Path, key: str = "prompt") -> list[str]:
    """The prompts of a ``.txt`` (one per line) or ``.jsonl`` (``{key: ...}`` per line) file, in file order."""
    return [prompt for prompt, _ in read_prompt_records(path, key)]


class PromptDataset(torch.utils.data.Dataset):
    """Prompts as dataset items ``{"caption": prompt, "key": "<index>", "metadata": dict | None}``."""

    def __init__(self, prompts: Sequence[str], metadata: Sequence[dict | None] | None = None):
        self.prompts = list(prompts)
        self.metadata = list(metadata) if metadata is not None else [None] * len(self.prompts)
        if len(self.metadata) != len(self.prompts):
            raise ValueError(f"PromptDataset: {len(self.metadata)} metadata entries for {len(self.prompts)} prompts")

    @classmethod
    def from_file(cls, path: str | Path, max_samples: int | None = None) -> "PromptDataset":
        records = read_prompt_records(path)[:max_samples]
        return cls([p for p, _ in records], [m for _, m in records])

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"caption": self.prompts[i], "key": str(i), "metadata": self.metadata[i]}


def collate_prompts(samples: Sequence[dict]) -> dict:
    return {
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "metadata": [s.get("metadata") for s in samples],
    }


def is_prompt_batch(batch: object) -> bool:
    """A batch of :class:`PromptDataset` items (captions and no images). An image dataset's batch always has
    ``size`` (its images' (h, w)), also when a complete encoder cache leaves out the pixels: that is no prompt batch."""
    return (
        isinstance(batch, dict)
        and "caption" in batch
        and "pixel_values" not in batch
        and "image" not in batch
        and "size" not in batch
    )


__all__ = [
    "PROMPT_SUFFIXES",
    "PromptDataset",
    "collate_prompts",
    "is_prompt_batch",
    "read_prompt_file",
    "read_prompt_records",
]
