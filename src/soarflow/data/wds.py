"""webdataset tar shards: samples are the members sharing a key (the member name up to the first dot of its base
name, webdataset's ``__key__``), with an image (``jpg``, ``png``, ``webp``, ...) and a caption (``txt`` by default,
or a ``json`` member's field of that name).

The shards are indexed once with the standard ``tarfile`` module; a record keeps the image member's data offset
and size (:class:`.records.TarMember`), so an image is read by seeking into its shard (random access for shuffled
epochs, no extraction to disk). ``data.path`` is a ``.tar`` file, a folder of them (recursively), a glob
(``shards/*.tar``) or a brace range (``shards-{000..009}.tar``). A member that is not a regular file (a link) is a
bad sample.
"""

from __future__ import annotations

import glob
import json
import re
import tarfile
from pathlib import Path

from .records import IMAGE_EXTENSIONS, BadSampleLog, ImageCaptionRecord, TarMember, check_record


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    a, b = m.group(1), m.group(2)
    width = len(a)
    return [
        p
        for i in range(int(a), int(b) + 1)
        for p in _expand_braces(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end() :])
    ]


def shard_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(p.rglob("*.tar"))
    elif p.is_file():
        files = [p]
    else:
        files = sorted({Path(f) for pat in _expand_braces(path) for f in glob.glob(pat)})
    if not files:
        raise FileNotFoundError(f"data.path: no webdataset .tar shards at {path}")
    return files


def _split(name: str) -> tuple[str, str]:
    """``dir/abc.seg.jpg`` -> (``dir/abc``, ``seg.jpg``): webdataset's key and extension."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def read_webdataset(path: str, log: BadSampleLog | None = None, caption_key: str = "txt") -> list[ImageCaptionRecord]:
    """Records of every sample in the shards at `path` (shard order, then member order)."""
    log = log or BadSampleLog()
    records = []
    for shard in shard_files(str(path)):
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                members = tar.getmembers()
                captions: dict[str, str] = {}
                for m in members:
                    key, ext = _split(m.name)
                    samples.setdefault(key, {})[ext] = m
                for key, parts in samples.items():
                    cap_member = parts.get(caption_key)
                    if cap_member is None and "json" in parts and parts["json"].isfile():
                        try:
                            meta = json.loads(tar.extractfile(parts["json"]).read().decode("utf-8"))
                            value = meta.get(caption_key) if isinstance(meta, dict) else None
                            captions[key] = value if isinstance(value, str) else ""
                        except ValueError:
                            captions[key] = ""
                    elif cap_member is not None and cap_member.isfile():
                        try:
                            captions[key] = tar.extractfile(cap_member).read().decode("utf-8").strip()
                        except UnicodeDecodeError:
                            captions[key] = ""
        except (tarfile.TarError, OSError) as err:
            log.report(str(shard), f"unreadable tar shard ({err})")
            continue
        for key, parts in samples.items():
            name = f"{shard}:{key}"
            image_ext = next((e for e in parts if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
            if image_ext is None:
                log.report(name, "no image member")
                continue
            member = parts[image_ext]
            if not member.isfile():
                log.report(name, f"image member {member.name} is not a regular file (a link?)")
                continue
            rec = ImageCaptionRecord(
                f"{shard.name}:{key}",
                TarMember(shard, member.name, member.offset_data, member.size),
                captions.get(key, ""),
            )
            if check_record(rec, log):
                records.append(rec)
    return records
