"""Hugging Face ``datasets`` readers: a ``save_to_disk`` folder, parquet files (as ``Dataset.to_parquet`` or the hub
write them) and streamed datasets.

The image column may be an ``Image`` feature (stored as ``{"bytes", "path"}``), raw bytes, or a path string; a
path (no embedded bytes) must lie inside the dataset's folder (:func:`.records.inside_root`). Records of a saved
dataset or a parquet file point at their row (:class:`ArrowRow`) and read the image bytes only when asked, so the
DataLoader's workers receive a few integers per record. A streamed dataset (``load_dataset(..., streaming=True)``:
a hub id, a local folder or parquet files) is read once, up to ``data.max_samples`` rows, and its encoded images are
kept in memory (:class:`.records.InMemoryImage`): use ``max_samples``, or ``soarflow cache`` then train from the
cache, for large streams.
"""

from __future__ import annotations

import functools
import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .records import BadSampleLog, ImageCaptionRecord, InMemoryImage, PathEscapeError, check_record, inside_root


def _require_datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "data.format hf_dataset / parquet / hf_streaming needs the `datasets` package: "
            "pip install 'soarflow[diffusers]' (or pip install datasets)"
        ) from None
    return datasets


@functools.lru_cache(maxsize=4)
def _saved_dataset(path: str, split: str):
    datasets = _require_datasets()
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"config key 'data.split': {path} has splits {sorted(ds)}, not {split!r}")
        ds = ds[split]
    return ds


@functools.lru_cache(maxsize=4)
def _undecoded_dataset(path: str, split: str, column: str):
    """The saved dataset with its Image column left as encoded bytes."""
    datasets = _require_datasets()
    ds = _saved_dataset(path, split)
    if isinstance(ds.features.get(column), datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds


def _parquet_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(p.rglob("*.parquet"))
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in glob.glob(path))
    if not files:
        raise FileNotFoundError(f"data.path: no parquet files at {path}")
    return files


@functools.lru_cache(maxsize=8)
def _parquet_row_group(file: str, group: int, column: str):
    import pyarrow.parquet as pq

    return pq.ParquetFile(file).read_row_group(group, columns=[column]).column(column).to_pylist()


def _image_bytes(value: Any, root: Path, name: str) -> bytes:
    """Encoded image bytes from an Image-feature dict, raw bytes, or a path inside `root`."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        rel = value
        if Path(value).is_absolute():
            real = Path(value).resolve()
            if real.is_relative_to(root.resolve()):
                rel = real.relative_to(root.resolve()).as_posix()
        return inside_root(root, rel, name).read_bytes()
    raise ValueError(f"data record {name}: no image bytes or path in the image column")


@functools.lru_cache(maxsize=16)
def _files_signature(path: str, kind: str) -> tuple:
    """(name, size, mtime) of the files holding a saved dataset's / parquet file's rows (once per process)."""
    files = sorted(Path(path).rglob("*.arrow")) if kind == "disk" else [Path(path)]
    return tuple(
        (f.relative_to(path).as_posix() if kind == "disk" else f.name, f.stat().st_size, f.stat().st_mtime_ns)
        for f in files
    )


@dataclass(frozen=True)
class ArrowRow:
    """Row `row` of a saved dataset (``kind="disk"``) or of one parquet file's row group (``kind="parquet"``)."""

    kind: str
    path: str
    row: int
    column: str
    split: str = "train"
    group: int = 0  # parquet: row group; `row` is then the row within it

    def read(self) -> bytes:
        if self.kind == "disk":
            value = _undecoded_dataset(self.path, self.split, self.column)[self.row][self.column]
            root = Path(self.path)
        else:
            value = _parquet_row_group(self.path, self.group, self.column)[self.row]
            root = Path(self.path).parent
        return _image_bytes(value, root, self.describe())

    def signature(self) -> tuple | None:
        return ("arrow", self.split, self.row, self.group, *_files_signature(self.path, self.kind))

    def describe(self) -> str:
        where = f"row group {self.group} row {self.row}" if self.kind == "parquet" else f"row {self.row}"
        return f"{self.path}[{where}]"


def _caption(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _check_columns(names, image_column: str, caption_column: str, where: str) -> None:
    for key, col in (("image_column", image_column), ("caption_column", caption_column)):
        if col not in names:
            raise ValueError(f"config key 'data.{key}': {where} has no column {col!r} (columns: {', '.join(names)})")


def read_saved_dataset(
    path: str | Path,
    log: BadSampleLog | None = None,
    *,
    image_column: str = "image",
    caption_column: str = "text",
    split: str = "train",
) -> list[ImageCaptionRecord]:
    """Records of a ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` folder."""
    log = log or BadSampleLog()
    if not Path(path).is_dir():
        raise FileNotFoundError(f"data.path: saved dataset folder not found: {path}")
    ds = _saved_dataset(str(path), split)
    _check_columns(ds.column_names, image_column, caption_column, str(path))
    records = []
    for row, caption in enumerate(ds[caption_column]):
        rec = ImageCaptionRecord(
            f"row{row:08d}", ArrowRow("disk", str(path), row, image_column, split), _caption(caption)
        )
        if check_record(rec, log):
            records.append(rec)
    return records


def read_parquet(
    path: str | Path,
    log: BadSampleLog | None = None,
    *,
    image_column: str = "image",
    caption_column: str = "text",
    split: str = "train",
) -> list[ImageCaptionRecord]:
    """Records of a parquet file, a folder of them (recursively) or a glob; read by row group."""
    import pyarrow.parquet as pq

    log = log or BadSampleLog()
    root = Path(path) if Path(path).is_dir() else Path(path).parent
    records = []
    for file in _parquet_files(str(path)):
        pf = pq.ParquetFile(file)
        _check_columns(pf.schema_arrow.names, image_column, caption_column, str(file))
        rel = file.relative_to(root).as_posix() if file.is_relative_to(root) else file.name
        for group in range(pf.metadata.num_row_groups):
            captions = pf.read_row_group(group, columns=[caption_column]).column(caption_column).to_pylist()
            for row, caption in enumerate(captions):
                rec = ImageCaptionRecord(
                    f"{rel}:{group}:{row}",
                    ArrowRow("parquet", str(file), row, image_column, split, group),
                    _caption(caption),
                )
                if check_record(rec, log):
                    records.append(rec)
    return records


def read_streaming(
    path: str,
    log: BadSampleLog | None = None,
    *,
    image_column: str = "image",
    caption_column: str = "text",
    split: str = "train",
    max_samples: int | None = None,
) -> list[ImageCaptionRecord]:
    """Records of ``load_dataset(path, split=split, streaming=True)`` (parquet files given as a file, folder or glob
    are streamed with the parquet builder), stopping after `max_samples` usable rows; images kept in memory."""
    datasets = _require_datasets()
    p = Path(path)
    if p.suffix == ".parquet" or (p.is_dir() and any(p.rglob("*.parquet"))) or "*" in path:
        stream = datasets.load_dataset(
            "parquet", data_files=[str(f) for f in _parquet_files(path)], split=split, streaming=True
        )
        root = p if p.is_dir() else p.parent
    else:
        stream = datasets.load_dataset(path, split=split, streaming=True)
        root = p if p.is_dir() else Path.cwd()
    features = stream.features or {}
    if features:
        _check_columns(list(features), image_column, caption_column, path)
        if isinstance(features.get(image_column), datasets.Image):
            stream = stream.cast_column(image_column, datasets.Image(decode=False))
    records = []
    for row, example in enumerate(stream):
        if max_samples is not None and len(records) >= max_samples:
            break
        name = f"{path}[{row}]"
        try:
            data = _image_bytes(example.get(image_column), root, name)
        except PathEscapeError:
            raise
        except (ValueError, OSError) as err:
            log.report(name, f"no readable image ({err})")
            continue
        rec = ImageCaptionRecord(f"row{row:08d}", InMemoryImage(data, name), _caption(example.get(caption_column)))
        if check_record(rec, log):
            records.append(rec)
    return records
