"""The data index: each record's image size and content hash, read once and kept in a small JSON file.

Bucketing needs every image's size and the encoder cache keys entries by a hash of the image bytes. Both are
computed the first time a record is seen (the bytes are read and hashed, the size comes from the image header:
no pixels are decoded) and stored with the record's *signature* (file size and modification time, or the shard's,
plus the member offset / table row), so a later run, epoch or process opens no image: a record is re-read only
when its signature changed (the file was replaced) or it has none (streamed bytes, hashed in memory).

An image whose header cannot be read is a bad sample (the data's ``on_bad_sample`` policy).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .records import BadSampleLog, ImageCaptionRecord

logger = logging.getLogger(__name__)

VERSION = 1


@dataclass(frozen=True)
class IndexEntry:
    sha256: str  # of the encoded image bytes
    width: int
    height: int


def image_info(data: bytes) -> tuple[str, int, int]:
    """(sha256 hex, width, height) of encoded image bytes; the header only is parsed."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
    return hashlib.sha256(data).hexdigest(), int(width), int(height)


def _plain(sig: tuple | None) -> list | None:
    """The signature as JSON gives it back (nested lists), so stored and fresh ones compare equal."""
    return None if sig is None else json.loads(json.dumps(list(sig)))


class DataIndex:
    """``entries[key] -> IndexEntry`` for the records of one data source, kept in `path` (None: in memory only)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self.stored: dict[str, list] = {}
        self.reads = 0  # images read by the last `update` (0 when everything was known)
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") == VERSION:
                    self.stored = data["entries"]
            except (ValueError, KeyError, TypeError):
                logger.warning("data index %s is unreadable; rebuilding it", self.path)

    def update(
        self, records: Sequence[ImageCaptionRecord], log: BadSampleLog
    ) -> list[tuple[ImageCaptionRecord, IndexEntry]]:
        """The usable records with their entries; unreadable images go to `log` (and are left out)."""
        out = []
        changed = False
        self.reads = 0
        for rec in records:
            sig = rec.image.signature()
            known = self.stored.get(rec.key)
            sig = _plain(sig)
            if known is not None and sig is not None and known[0] == sig:
                out.append((rec, IndexEntry(known[1], known[2], known[3])))
                continue
            try:
                self.reads += 1
                sha, w, h = image_info(rec.image.read())
            except Exception as err:  # PIL raises many types for truncated / corrupt files
                log.report(rec.name, f"cannot read the image ({type(err).__name__}: {err})")
                continue
            if sig is not None:
                self.stored[rec.key] = [sig, sha, w, h]
                changed = True
            out.append((rec, IndexEntry(sha, w, h)))
        if changed:
            self.save()
        return out

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": VERSION, "entries": self.stored}))
            os.replace(tmp, self.path)
        except OSError as err:
            logger.warning(
                "cannot write the data index %s (%s); image sizes will be read again next run", self.path, err
            )


def source_id(parts: dict) -> str:
    """A short hash naming a data source's index file."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
