"""Readers for the two image-caption formats users have, and the bad-sample policy.

* **imagefolder** (Hugging Face convention): a folder with ``metadata.jsonl``, one JSON object per line with
  ``file_name`` (relative to the folder) and ``text``; optional ``width``/``height`` help bucketing.
* **SOAR JSONL** (the paper's release): one object per line with ``md5``, ``caption_en``, and the image size
  ``bw``/``bh``; the image is ``{image_dir}/{md5}.jpg``.

A missing image file, an unparsable line or an empty caption is a *bad sample*, reported with its file name.
``on_bad_sample="fail"`` raises a ValueError naming it; ``"skip"`` (default) logs it, leaves it out and counts it.
Images that turn out to be corrupt only when decoded are handled the same way by the dataset.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

BadSamplePolicy = Literal["skip", "fail"]
IMAGE_FORMATS = ("imagefolder", "soar_jsonl")


@dataclass(frozen=True)
class ImageCaptionRecord:
    """One training sample before decoding: the image file, its caption, and its size when the metadata has it."""

    key: str  # stable identifier (relative file name or md5), used by the encoding cache
    image_path: Path
    caption: str
    width: int | None = None
    height: int | None = None


@dataclass
class BadSampleLog:
    """Applies the bad-sample policy and remembers what was skipped (file name and reason)."""

    policy: BadSamplePolicy = "skip"
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.policy not in ("skip", "fail"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'fail', got {self.policy!r}")

    def report(self, name: str, reason: str) -> None:
        if self.policy == "fail":
            raise ValueError(f"bad sample {name}: {reason} (on_bad_sample=fail; use skip to leave it out)")
        self.skipped.append((name, reason))
        logger.warning("skipping bad sample %s: %s", name, reason)

    @property
    def count(self) -> int:
        return len(self.skipped)

    def summary(self) -> str:
        if not self.skipped:
            return "bad samples skipped: 0"
        names = ", ".join(n for n, _ in self.skipped[:5]) + (" ..." if self.count > 5 else "")
        return f"bad samples skipped: {self.count} ({names})"


def _read_jsonl(path: Path, log: BadSampleLog) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise FileNotFoundError(f"metadata file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"metadata file {path} is not UTF-8 text ({err})") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            log.report(f"{path}:{lineno}", f"unparsable line ({err})")
            continue
        rows.append((lineno, row))
    return rows


def _int_or_none(value) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _check(record: ImageCaptionRecord, log: BadSampleLog) -> bool:
    if not record.caption.strip():
        log.report(str(record.image_path), "empty caption")
        return False
    if not record.image_path.is_file():
        log.report(str(record.image_path), "image file is missing")
        return False
    return True


def read_imagefolder(root: str | Path, log: BadSampleLog | None = None, caption_column: str = "text") -> list[ImageCaptionRecord]:
    """Records of an imagefolder dataset (``root/metadata.jsonl`` with ``file_name`` and ``text``)."""
    log = log or BadSampleLog()
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.path: image folder not found: {root}")
    records = []
    for lineno, row in _read_jsonl(root / "metadata.jsonl", log):
        name = row.get("file_name")
        if not isinstance(name, str) or not name:
            log.report(f"{root / 'metadata.jsonl'}:{lineno}", "no 'file_name'")
            continue
        caption = row.get(caption_column)
        rec = ImageCaptionRecord(name, root / name, caption if isinstance(caption, str) else "",
                          _int_or_none(row.get("width")), _int_or_none(row.get("height")))
        if _check(rec, log):
            records.append(rec)
    return records


def read_soar_jsonl(jsonl: str | Path, image_dir: str | Path, log: BadSampleLog | None = None) -> list[ImageCaptionRecord]:
    """Records of the official SOAR JSONL (``md5``, ``caption_en``, ``bw``, ``bh``; images ``{md5}.jpg``)."""
    log = log or BadSampleLog()
    jsonl, image_dir = Path(jsonl), Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"data.image_dir: folder not found: {image_dir}")
    records = []
    for lineno, row in _read_jsonl(jsonl, log):
        md5 = row.get("md5")
        if not isinstance(md5, str) or not md5:
            log.report(f"{jsonl}:{lineno}", "no 'md5'")
            continue
        caption = row.get("caption_en")
        rec = ImageCaptionRecord(md5, image_dir / f"{md5}.jpg", caption if isinstance(caption, str) else "",
                          _int_or_none(row.get("bw")), _int_or_none(row.get("bh")))
        if _check(rec, log):
            records.append(rec)
    return records
