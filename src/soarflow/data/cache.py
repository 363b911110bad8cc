"""Disk cache of VAE latents and text embeddings, so epochs after the first skip the frozen encoders.

Entries are written in safetensors shards (``shard-r{rank}-{n}.safetensors``, tensor names ``{entry}/{field}``)
under ``cache_dir/{fingerprint}``, where the fingerprint hashes everything the encodings depend on (model
path and the VAE/text-encoder configs, resolution, bucketing, text length). Changing the model or the
resolution therefore selects a fresh folder: stale encodings are never read, and nothing is deleted.
Each process writes its own shards; a shard is written once (to a .tmp file, then renamed) and never changed.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def fingerprint(spec: dict[str, Any]) -> str:
    """Short stable hash of a JSON-serialisable description of the encoders and preprocessing."""
    text = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class EncodingCache:
    """``get(entry) -> dict[str, Tensor] | None`` and ``put(entry, tensors)``; pending entries are written
    every `shard_size` puts, by ``flush()`` and when the process exits."""

    def __init__(self, root: str | Path, spec: dict[str, Any], shard_size: int = 256, rank: int = 0):
        self.dir = Path(root) / fingerprint(spec)
        self.dir.mkdir(parents=True, exist_ok=True)
        spec_file = self.dir / "spec.json"
        if not spec_file.exists():
            spec_file.write_text(json.dumps(spec, sort_keys=True, indent=1, default=str))
        self.shard_size = shard_size
        self.rank = rank
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.location: dict[str, Path] = {}
        self._scanned: set[Path] = set()
        self._scan()
        atexit.register(self._flush_at_exit)  # every process keeps what it encoded, also on non-main ranks

    def _scan(self) -> None:
        """Index shards not seen yet (other processes keep writing theirs during a run)."""
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            if shard in self._scanned:
                continue
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    self.location[name.rsplit("/", 1)[0]] = shard
            self._scanned.add(shard)

    def _flush_at_exit(self) -> None:
        try:
            self.flush()
        except OSError:  # the folder may be gone (temporary runs); the cache is only an optimisation
            pass

    def __contains__(self, entry: str) -> bool:
        return entry in self.pending or entry in self.location

    def __len__(self) -> int:
        return len(set(self.location) | set(self.pending))

    def get(self, entry: str) -> dict[str, torch.Tensor] | None:
        if entry in self.pending:
            return self.pending[entry]
        shard = self.location.get(entry)
        if shard is None:
            self._scan()
            shard = self.location.get(entry)
        if shard is None:
            return None
        out = {}
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                if name.startswith(entry + "/"):
                    out[name[len(entry) + 1 :]] = f.get_tensor(name)
        return out

    def put(self, entry: str, tensors: dict[str, torch.Tensor]) -> None:
        if "/" in entry:
            raise ValueError(f"cache entry names may not contain '/': {entry!r}")
        self.pending[entry] = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> Path | None:
        if not self.pending:
            return None
        n = len(list(self.dir.glob(f"shard-r{self.rank}-*.safetensors")))
        path = self.dir / f"shard-r{self.rank}-{n:05d}.safetensors"
        while path.exists():
            n += 1
            path = self.dir / f"shard-r{self.rank}-{n:05d}.safetensors"
        tensors = {f"{entry}/{k}": v for entry, fields in self.pending.items() for k, v in fields.items()}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        for entry in self.pending:
            self.location[entry] = path
        self._scanned.add(path)
        self.pending = {}
        return path
