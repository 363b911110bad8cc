r"""Disk cache of VAE latents and text embeddings, so training runs neither the VAE encoder nor the text encoders.

Layout under ``data.cache_dir``::

    text-<fingerprint>/shard-<time_ns>-r<rank>.safetensors    one entry per caption (and validation prompt, and "")
    latent-<fingerprint>/shard-<time_ns>-r<rank>.safetensors  one entry per (image bytes, bucket)
    index/<source>.json                                        the data index (image sizes and hashes)

A folder's fingerprint hashes what its encodings depend on (text: the tokenizers' and text encoders' configs, the
model path / revision / variant, ``frozen_dtype``, ``max_sequence_length``, the stored dtype; latents: the VAE's
config and the same model identity), so changing the model or the text length selects a new folder; old encodings
are never read and never deleted. Inside a folder an entry's name is a hash of its *content*: the caption's
UTF-8 bytes (:func:`text_key`), or the image's bytes and the size it is cropped to (:func:`latent_key`). So a
changed image or caption gets a new name and is encoded again, and every other entry is kept.

A shard is written once (to a .tmp file, then renamed) and never changed; names sort by write time and, when an
entry is in several shards (it was re-encoded because the older copy was corrupt), the newest wins. A shard that
safetensors cannot open is moved aside to ``*.corrupt`` (its entries then count as missing and are encoded again);
an entry with the wrong fields or shapes, or a non-finite value, is found by :meth:`EncodingCache.verify`.
Entries are stored in ``dtype`` (bfloat16 by default: 2 bytes per value) and read back as float32.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

CACHE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def fingerprint(spec: dict[str, Any]) -> str:
    """Short stable hash of a JSON-serialisable description of the encoders and preprocessing."""
    text = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def text_key(caption: str) -> str:
    """Entry name of a caption's text condition: ``t`` + sha256 of its UTF-8 bytes."""
    return "t" + hashlib.sha256(caption.encode("utf-8")).hexdigest()[:40]


def latent_key(image_sha256: str, height: int, width: int) -> str:
    """Entry name of an image's VAE posterior at crop size (height, width)."""
    return f"l{image_sha256[:40]}-{height}x{width}"


class CorruptEntry(ValueError):
    """A cache entry that is missing fields, has the wrong shape or holds non-finite values."""


class EncodingCache:
    """``get(entry) -> dict[str, Tensor] | None`` and ``put(entry, tensors)`` in one fingerprinted folder; pending
    entries are written every `shard_size` puts, by ``flush()`` and when the process exits."""

    def __init__(
        self,
        root: str | Path,
        spec: dict[str, Any],
        shard_size: int = 256,
        rank: int = 0,
        dtype: torch.dtype = torch.float32,
        prefix: str = "",
    ):
        self.dir = Path(root) / f"{prefix}{fingerprint(spec)}"
        self.dir.mkdir(parents=True, exist_ok=True)
        spec_file = self.dir / "spec.json"
        if not spec_file.exists():
            tmp = self.dir / f"spec.json.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(spec, sort_keys=True, indent=1, default=str))
            os.replace(tmp, spec_file)
        self.shard_size = shard_size
        self.rank = rank
        self.dtype = dtype
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.location: dict[str, Path] = {}
        self.corrupt_shards: list[Path] = []
        self._scanned: set[Path] = set()
        self._scan()
        atexit.register(self._flush_at_exit)  # every process keeps what it encoded, also on non-main ranks

    def _scan(self) -> None:
        """Index shards not seen yet (other processes keep writing theirs); newer shards win."""
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            if shard in self._scanned:
                continue
            try:
                with safe_open(str(shard), framework="pt") as f:
                    names = list(f.keys())
            except (SafetensorError, OSError, ValueError) as err:
                self._set_aside(shard, err)
                continue
            for name in names:
                self.location[name.rsplit("/", 1)[0]] = shard
            self._scanned.add(shard)

    def _set_aside(self, shard: Path, err: Exception) -> None:
        target = shard.with_suffix(".corrupt")
        logger.warning(
            "encoder cache shard %s is unreadable (%s); moved to %s, its entries will be encoded again",
            shard,
            err,
            target.name,
        )
        try:
            os.replace(shard, target)
        except OSError:
            pass
        self.corrupt_shards.append(shard)
        self.location = {k: v for k, v in self.location.items() if v != shard}

    def _flush_at_exit(self) -> None:
        try:
            self.flush()
        except OSError:  # the folder may be gone (temporary runs); the cache is only an optimisation
            pass

    def refresh(self) -> None:
        self._scan()

    def __contains__(self, entry: str) -> bool:
        return entry in self.pending or entry in self.location

    def __len__(self) -> int:
        return len(set(self.location) | set(self.pending))

    def shard_of(self, entry: str) -> Path | None:
        return self.location.get(entry)

    def get(self, entry: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors (in the stored dtype), or None when absent. A shard that became unreadable raises
        CorruptEntry naming it."""
        if entry in self.pending:
            return self.pending[entry]
        shard = self.location.get(entry)
        if shard is None:
            self._scan()
            shard = self.location.get(entry)
        if shard is None:
            return None
        out = {}
        try:
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    if name.startswith(entry + "/"):
                        out[name[len(entry) + 1 :]] = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as err:
            raise CorruptEntry(f"encoder cache entry {entry}: shard {shard} is unreadable ({err})") from None
        return out

    def verify(
        self, entry: str, tensors: dict[str, torch.Tensor] | None, shapes: dict[str, tuple[int, ...]] | None
    ) -> str | None:
        """Why `tensors` (entry `entry`) is unusable — missing, other fields or shapes than `shapes` (when given),
        non-finite values — or None when it is fine."""
        if tensors is None:
            return "missing"
        if shapes is not None:
            if set(tensors) != set(shapes):
                return f"fields {sorted(tensors)} instead of {sorted(shapes)}"
            for k, shape in shapes.items():
                if tuple(tensors[k].shape) != tuple(shape):
                    return f"field {k} has shape {tuple(tensors[k].shape)}, expected {tuple(shape)}"
        for k, v in tensors.items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return f"field {k} holds non-finite values"
        return None

    def load(self, entry: str, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
        """The entry as float32 tensors, checked by :meth:`verify`; CorruptEntry names the entry and its shard."""
        tensors = self.get(entry)
        problem = self.verify(entry, tensors, shapes)
        if problem is not None:
            where = f" in {self.location.get(entry) or self.dir}"
            raise CorruptEntry(
                f"encoder cache entry {entry}{where}: {problem}; run `soarflow cache --config <your "
                "config>` to (re-)encode it"
            )
        return {k: v.float() for k, v in tensors.items()}

    def put(self, entry: str, tensors: dict[str, torch.Tensor]) -> None:
        if "/" in entry:
            raise ValueError(f"cache entry names may not contain '/': {entry!r}")
        self.pending[entry] = {
            k: v.detach().to("cpu", self.dtype if v.is_floating_point() else v.dtype).contiguous()
            for k, v in tensors.items()
        }
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> Path | None:
        if not self.pending:
            return None
        path = self.dir / f"shard-{time.time_ns():020d}-r{self.rank}.safetensors"
        while path.exists():
            path = self.dir / f"shard-{time.time_ns():020d}-r{self.rank}.safetensors"
        tensors = {f"{entry}/{k}": v for entry, fields in self.pending.items() for k, v in fields.items()}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        for entry in self.pending:
            self.location[entry] = path
        self._scanned.add(path)
        self.pending = {}
        return path

    # -- the fields and shapes of this folder's text entries (every caption's are alike) ------------------------
    def schema(self) -> dict[str, tuple[int, ...]] | None:
        path = self.dir / "schema.json"
        if not path.is_file():
            return None
        try:
            return {k: tuple(v) for k, v in json.loads(path.read_text()).items()}
        except (ValueError, AttributeError):
            return None

    def set_schema(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.schema() is not None:
            return
        tmp = self.dir / f"schema.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({k: list(v.shape) for k, v in tensors.items()}))
        os.replace(tmp, self.dir / "schema.json")
