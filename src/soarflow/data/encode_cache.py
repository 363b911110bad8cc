r"""Fill the encoder cache before training (``soarflow cache``), split across processes, resumable.

The work is every distinct caption (the records', the validation prompts and the empty prompt, whose encoding is
the null condition) and every distinct (image, crop size). Entry names are content hashes
(:func:`.cache.text_key`, :func:`.cache.latent_key`), sorted, and process ``r`` of ``W`` takes names
``r, r + W, ...``: it checks the ones already stored (:meth:`.cache.EncodingCache.verify`: fields, shapes,
finite values) and encodes the ones that are missing or corrupt, in batches of one crop size, writing a shard
every ``shard_size`` entries. An interrupted run therefore loses at most the entries not yet written; running it
again encodes only those. An image that cannot be decoded is reported to the bad-sample policy and listed in the
latent folder's ``unreadable-r<rank>.json``, so training leaves it out instead of encoding it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from .cache import CorruptEntry, EncodingCache, latent_key, text_key
from .dataset import ImageCaptionDataset

logger = logging.getLogger(__name__)


class Encoder(Protocol):
    """What a model family supplies: its frozen encoders, batched, results per sample on the CPU."""

    def encode_captions(self, prompts: list[str]) -> list[dict[str, torch.Tensor]]: ...

    def encode_pixels(self, pixels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """``latent_mean`` and ``latent_std`` per image of (B, 3, h, w) in [-1, 1]."""

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]: ...


def latent_shapes(encoder_or_shape, height: int, width: int) -> dict[str, tuple[int, ...]]:
    shape = tuple(encoder_or_shape(height, width))
    return {"latent_mean": shape, "latent_std": shape}


def unreadable_images(cache: EncodingCache) -> dict[str, str]:
    """Latent entry names that `soarflow cache` could not decode (entry -> reason), from every process's list."""
    out: dict[str, str] = {}
    for path in sorted(cache.dir.glob("unreadable-r*.json")):
        try:
            out.update(json.loads(path.read_text()))
        except ValueError:
            logger.warning("ignoring unreadable list %s", path)
    return out


def dataset_latent_keys(dataset: ImageCaptionDataset) -> list[str]:
    """Each record's latent entry name (its image hash and crop size); records need ``sha256`` (the data index)."""
    keys = []
    for i, rec in enumerate(dataset.records):
        if rec.sha256 is None:
            raise ValueError(f"record {rec.name} has no image hash; build the records through the data index")
        h, w = dataset.bucket_of(i)
        keys.append(latent_key(rec.sha256, h, w))
    return keys


@dataclass
class FillReport:
    rank: int
    text_checked: int = 0
    text_encoded: int = 0
    latents_checked: int = 0
    latents_encoded: int = 0
    corrupt: list[str] = field(default_factory=list)  # entries found corrupt and encoded again
    unreadable: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"rank {self.rank}: text {self.text_encoded} encoded / {self.text_checked} kept, latents "
            f"{self.latents_encoded} encoded / {self.latents_checked} kept, {len(self.corrupt)} corrupt "
            f"re-encoded, {len(self.unreadable)} unreadable images, {self.seconds:.1f} s"
        )


def _check(cache: EncodingCache, name: str, shapes, report: FillReport) -> bool:
    """True when `name` is stored and sound; a corrupt one is logged (and will be encoded again)."""
    if name not in cache:
        return False
    try:
        problem = cache.verify(name, cache.get(name), shapes)
    except CorruptEntry as err:
        problem = str(err)
    if problem is None:
        return True
    logger.warning(
        "encoder cache entry %s in %s is corrupt (%s); encoding it again", name, cache.shard_of(name), problem
    )
    report.corrupt.append(name)
    return False


def fill_cache(
    text_cache: EncodingCache,
    latent_cache: EncodingCache,
    dataset: ImageCaptionDataset,
    prompts: Sequence[str],
    encoder: Encoder,
    *,
    rank: int = 0,
    world: int = 1,
    batch_size: int = 8,
    on_progress: Callable[[str], None] | None = None,
) -> FillReport:
    """Encode this process's share of the missing or corrupt entries (see the module docstring)."""
    start = time.perf_counter()
    report = FillReport(rank)
    say = on_progress or (lambda msg: logger.info(msg))

    # -- text: captions, validation prompts and the empty prompt ------------------------------------------------
    captions = {text_key(c): c for c in [*(r.caption for r in dataset.records), *prompts, ""]}
    mine = sorted(captions)[rank::world]
    schema = text_cache.schema()
    todo = [k for k in mine if not _check(text_cache, k, schema, report)]
    report.text_checked = len(mine) - len(todo)
    for s in range(0, len(todo), batch_size):
        chunk = todo[s : s + batch_size]
        for name, tensors in zip(chunk, encoder.encode_captions([captions[k] for k in chunk])):
            text_cache.set_schema(tensors)
            text_cache.put(name, tensors)
        report.text_encoded += len(chunk)
        say(f"rank {rank}: text {report.text_encoded}/{len(todo)}")
    text_cache.flush()

    # -- latents: one per distinct (image bytes, crop size) ----------------------------------------------------
    first: dict[str, int] = {}
    for i, name in enumerate(dataset_latent_keys(dataset)):
        first.setdefault(name, i)
    mine = sorted(first)[rank::world]
    todo = []
    for name in mine:
        h, w = dataset.bucket_of(first[name])
        if not _check(latent_cache, name, latent_shapes(encoder.latent_shape, h, w), report):
            todo.append(name)
    report.latents_checked = len(mine) - len(todo)
    by_size: dict[tuple[int, int], list[str]] = {}
    for name in todo:
        by_size.setdefault(dataset.bucket_of(first[name]), []).append(name)
    unreadable: dict[str, str] = {}
    done = 0
    for (h, w), names in sorted(by_size.items()):
        for s in range(0, len(names), batch_size):
            chunk, pixels = [], []
            for name in names[s : s + batch_size]:
                i = first[name]
                try:
                    item = dataset.load(i)
                except Exception as err:  # PIL raises many types for truncated / corrupt files
                    reason = f"cannot decode image ({type(err).__name__}: {err})"
                    dataset.bad_samples.report(dataset.records[i].name, reason)
                    unreadable[name] = reason
                    continue
                if tuple(item["pixel_values"].shape[-2:]) != (h, w):
                    raise ValueError(
                        f"record {dataset.records[i].name}: decoded to {tuple(item['pixel_values'].shape[-2:])} "
                        f"but the data index gives bucket {(h, w)}; delete the index file and rerun"
                    )
                chunk.append(name)
                pixels.append(item["pixel_values"])
            if chunk:
                for name, tensors in zip(chunk, encoder.encode_pixels(torch.stack(pixels))):
                    latent_cache.put(name, tensors)
            done += len(names[s : s + batch_size])
            report.latents_encoded += len(chunk)
            say(f"rank {rank}: latents {done}/{len(todo)}")
    latent_cache.flush()
    if unreadable:
        path = latent_cache.dir / f"unreadable-r{rank}.json"
        previous = json.loads(path.read_text()) if path.is_file() else {}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**previous, **unreadable}, indent=1))
        os.replace(tmp, path)
    report.unreadable = sorted(unreadable)
    report.seconds = time.perf_counter() - start
    return report


def missing_entries(
    text_cache: EncodingCache, latent_cache: EncodingCache, dataset: ImageCaptionDataset, prompts: Sequence[str]
) -> tuple[list[str], list[int]]:
    """(captions without a text entry, dataset indices without a latent entry and not listed as unreadable); reads
    only the shards' headers."""
    text_cache.refresh()
    latent_cache.refresh()
    captions = sorted(
        {c for c in [*(r.caption for r in dataset.records), *prompts, ""] if text_key(c) not in text_cache}
    )
    bad = unreadable_images(latent_cache)
    images = [i for i, name in enumerate(dataset_latent_keys(dataset)) if name not in latent_cache and name not in bad]
    return captions, images


def cache_size_bytes(*caches: EncodingCache) -> int:
    return sum(p.stat().st_size for c in caches for p in Path(c.dir).glob("shard-*.safetensors"))
