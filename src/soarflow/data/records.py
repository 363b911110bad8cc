"""One record interface for every image-caption format, the bad-sample policy and the dataset-root check.

A record (:class:`ImageCaptionRecord`) is a key, a caption, an *image source* (where its encoded bytes are: a file,
a member of a tar shard, a row of an Arrow/parquet table, or bytes already in memory) and the image size when
known. The readers (this module: image folders and the SOAR JSONL; :mod:`.hf`: Hugging Face ``datasets``;
:mod:`.wds`: webdataset shards; :func:`read_records` picks one by ``format``) only list records; images are decoded
by the dataset.

* **imagefolder**: a folder with ``metadata.jsonl`` (``file_name`` relative to the folder, and the caption column,
  default ``text``; optional ``width``/``height``), or, without it, every image with a ``.txt`` sidecar caption of
  the same stem (``a/b.jpg`` + ``a/b.txt``), recursively.
* **soar_jsonl** (the paper's release): ``md5``, ``caption_en`` and the size ``bw``/``bh``; the image is
  ``{image_dir}/{md5}.jpg``.

A missing image, an unparsable line or an empty caption is a *bad sample*, reported with its name:
``on_bad_sample="fail"`` raises a ValueError naming it; ``"skip"`` (default) logs it, leaves it out and counts it.
Images that turn out to be corrupt when their header or pixels are read are handled the same way.

A record whose file would lie outside the dataset root (a ``..`` component, an absolute path, or a symlink that
resolves elsewhere) is refused whatever the policy: :class:`PathEscapeError` names the record.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

logger = logging.getLogger(__name__)

BadSamplePolicy = Literal["skip", "fail"]
IMAGE_FORMATS = ("imagefolder", "soar_jsonl", "hf_dataset", "parquet", "hf_streaming", "webdataset")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class PathEscapeError(ValueError):
    """A record's image path leaves the dataset root."""


def inside_root(root: Path, relative: str, record: str) -> Path:
    """``root / relative``, refused (PathEscapeError naming `record`) when `relative` is absolute, has a ``..``
    component, or resolves (through symlinks) outside ``root``."""
    rel = Path(relative)
    if rel.is_absolute() or relative.startswith(("/", "\\")) or Path(relative).drive:
        raise PathEscapeError(
            f"data record {record}: image path {relative!r} is absolute; paths must be relative "
            f"to the dataset root {root}"
        )
    if ".." in rel.parts or ".." in relative.replace("\\", "/").split("/"):
        raise PathEscapeError(
            f"data record {record}: image path {relative!r} leaves the dataset root {root} through '..'"
        )
    path = root / rel
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise PathEscapeError(
            f"data record {record}: image path {relative!r} resolves to {real}, outside the "
            f"dataset root {real_root} (a symlink leaving the root)"
        )
    return path


# ------------------------------------------------------------------------------------------------ image sources


class ImageSource(Protocol):
    def read(self) -> bytes: ...

    def signature(self) -> tuple | None:
        """What identifies the bytes without reading them (file size + mtime, ...); None: always re-hash."""

    def describe(self) -> str: ...


@dataclass(frozen=True)
class FileImage:
    path: Path

    def read(self) -> bytes:
        return Path(self.path).read_bytes()

    def signature(self) -> tuple | None:
        st = os.stat(self.path)
        return ("file", st.st_size, st.st_mtime_ns)

    def describe(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class TarMember:
    """A regular member of a tar shard, read at its data offset (random access, no extraction)."""

    tar: Path
    name: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.tar, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.tar} is truncated at member {self.name}")
        return data

    def signature(self) -> tuple | None:
        st = os.stat(self.tar)
        return ("tar", st.st_size, st.st_mtime_ns, self.offset, self.size)

    def describe(self) -> str:
        return f"{self.tar}:{self.name}"


@dataclass(frozen=True)
class InMemoryImage:
    """Encoded bytes already read (streamed datasets)."""

    data: bytes = field(repr=False)
    origin: str = ""

    def read(self) -> bytes:
        return self.data

    def signature(self) -> tuple | None:
        return None

    def describe(self) -> str:
        return self.origin or "<in memory>"


@dataclass(frozen=True)
class ImageCaptionRecord:
    """One training sample before decoding. ``image`` may be given as a path (a file)."""

    key: str  # stable identifier within the dataset (relative file name, md5, shard:key, row)
    image: Any  # an ImageSource (FileImage, TarMember, ArrowRow, InMemoryImage) or a path
    caption: str
    width: int | None = None
    height: int | None = None
    sha256: str | None = None  # of the encoded image bytes (filled from the data index; keys the encoder cache)

    def __post_init__(self) -> None:
        if isinstance(self.image, (str, Path)):
            object.__setattr__(self, "image", FileImage(Path(self.image)))

    @property
    def image_path(self) -> Path | None:
        """The image file, for records read from files (None for tar members, table rows, streamed bytes)."""
        return Path(self.image.path) if isinstance(self.image, FileImage) else None

    @property
    def name(self) -> str:
        """Where the image is, for messages."""
        return self.image.describe()

    def open_image(self):
        """The PIL image (not yet decoded)."""
        from PIL import Image

        if isinstance(self.image, FileImage):
            return Image.open(self.image.path)
        return Image.open(io.BytesIO(self.image.read()))


@dataclass
class BadSampleLog:
    """Applies the bad-sample policy and remembers what was skipped (name and reason)."""

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


def int_or_none(value) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def check_record(record: ImageCaptionRecord, log: BadSampleLog) -> bool:
    """Report an empty caption or a missing image file; True when the record is usable so far."""
    if not record.caption.strip():
        log.report(record.name, "empty caption")
        return False
    path = record.image_path
    if path is not None and not path.is_file():
        log.report(record.name, "image file is missing")
        return False
    return True


def read_imagefolder(
    root: str | Path, log: BadSampleLog | None = None, caption_column: str = "text"
) -> list[ImageCaptionRecord]:
    """Records of an image folder: ``root/metadata.jsonl`` (``file_name`` + `caption_column`) when present, else
    every image with a ``.txt`` sidecar caption."""
    log = log or BadSampleLog()
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.path: image folder not found: {root}")
    if not (root / "metadata.jsonl").is_file():
        return read_sidecar_folder(root, log)
    meta = root / "metadata.jsonl"
    records = []
    for lineno, row in _read_jsonl(meta, log):
        name = row.get("file_name")
        if not isinstance(name, str) or not name:
            log.report(f"{meta}:{lineno}", "no 'file_name'")
            continue
        path = inside_root(root, name, f"{meta}:{lineno}")
        caption = row.get(caption_column)
        rec = ImageCaptionRecord(
            name,
            path,
            caption if isinstance(caption, str) else "",
            int_or_none(row.get("width")),
            int_or_none(row.get("height")),
        )
        if check_record(rec, log):
            records.append(rec)
    return records


def read_sidecar_folder(root: str | Path, log: BadSampleLog | None = None) -> list[ImageCaptionRecord]:
    """Every image under `root` (recursively, sorted) with its caption in ``<stem>.txt`` beside it."""
    log = log or BadSampleLog()
    root = Path(root)
    images = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not any(p.with_suffix(".txt").is_file() for p in images):
        raise FileNotFoundError(
            f"data.path: {root} has neither metadata.jsonl nor images with .txt sidecar captions "
            f"({len(images)} images without one)"
        )
    records = []
    for path in images:
        rel = path.relative_to(root).as_posix()
        path = inside_root(root, rel, rel)
        sidecar = path.with_suffix(".txt")
        if not sidecar.is_file():
            log.report(str(path), f"no caption file {sidecar.name}")
            continue
        inside_root(root, sidecar.relative_to(root).as_posix(), rel)
        try:
            caption = sidecar.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as err:
            log.report(str(sidecar), f"caption is not UTF-8 text ({err})")
            continue
        rec = ImageCaptionRecord(rel, path, caption)
        if check_record(rec, log):
            records.append(rec)
    return records


def read_soar_jsonl(
    jsonl: str | Path, image_dir: str | Path, log: BadSampleLog | None = None
) -> list[ImageCaptionRecord]:
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
        path = inside_root(image_dir, f"{md5}.jpg", f"{jsonl}:{lineno}")
        caption = row.get("caption_en")
        rec = ImageCaptionRecord(
            md5,
            path,
            caption if isinstance(caption, str) else "",
            int_or_none(row.get("bw")),
            int_or_none(row.get("bh")),
        )
        if check_record(rec, log):
            records.append(rec)
    return records


@dataclass(frozen=True)
class DataSource:
    """What :func:`read_records` needs: the format and its options (the ``data:`` section's keys)."""

    format: str
    path: str
    image_dir: str | None = None
    caption_column: str | None = None  # None: the format's default (text; caption_en; txt)
    image_column: str = "image"
    split: str = "train"
    max_samples: int | None = None


def read_records(source: DataSource, log: BadSampleLog) -> list[ImageCaptionRecord]:
    """The records of any supported format (see the module docstring and :mod:`.hf`, :mod:`.wds`)."""
    fmt = source.format
    if fmt == "imagefolder":
        recs = read_imagefolder(source.path, log, caption_column=source.caption_column or "text")
    elif fmt == "soar_jsonl":
        recs = read_soar_jsonl(source.path, source.image_dir, log)
    elif fmt in ("hf_dataset", "parquet", "hf_streaming"):
        from . import hf

        reader = {"hf_dataset": hf.read_saved_dataset, "parquet": hf.read_parquet, "hf_streaming": hf.read_streaming}[
            fmt
        ]
        kwargs = {"max_samples": source.max_samples} if fmt == "hf_streaming" else {}
        recs = reader(
            source.path,
            log,
            image_column=source.image_column,
            caption_column=source.caption_column or "text",
            split=source.split,
            **kwargs,
        )
    elif fmt == "webdataset":
        from .wds import read_webdataset

        recs = read_webdataset(source.path, log, caption_key=source.caption_column or "txt")
    else:
        raise ValueError(f"config key 'data.format': must be one of {', '.join(IMAGE_FORMATS)} (got {fmt!r})")
    if source.max_samples is not None:
        recs = recs[: source.max_samples]
    return recs
