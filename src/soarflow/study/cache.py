"""The committed cell cache (``soarflow study --cells_dir DIR``): one compact JSON file per finished cell,
``DIR/<hash>.json``, meant to live in the repository so that finished cells survive a restart on a fresh machine.

A file holds the cell's result record as the runner writes it to ``<output_dir>/cells/<hash>/result.json``
(row, seed, hash, training config, arms with their metrics and per-image results, curve, run configuration),
with three reductions that keep it small enough to commit:

* the per-step training history (and any traceback) is dropped; weights are never written here;
* every float outside the training config is rounded to :data:`SIG_DIGITS` significant digits (the config is
  kept exact: the cache compares it with the cell's);
* a per-image list whose values are all 0 or 1 (pass/fail) is stored as integers; no indentation.

A file is reused when its recorded hash and config are the cell's and its status is ``ok`` (the same rule as
``<output_dir>/cells``); a failed cell is never written here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .spec import identity_config

SIG_DIGITS = 6
DROPPED = ("history", "traceback")


def round_floats(value: Any, digits: int = SIG_DIGITS) -> Any:
    """`value` with every finite float rounded to `digits` significant digits (dicts and lists walked)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_floats(v, digits) for v in value]
    return value


def _per_image(value: Any) -> Any:
    """Inside a ``per_image`` mapping: 0/1 lists as ints, other lists rounded."""
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and v in (0, 1) for v in value):
        return [int(v) for v in value]
    return round_floats(value)


def _compact(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: ({m: _per_image(v) for m, v in x.items()} if k == "per_image" and isinstance(x, dict) else _compact(x))
            for k, x in value.items()
        }
    if isinstance(value, list):
        return [_compact(v) for v in value]
    return round_floats(value)


def compact(record: dict) -> dict:
    """The committed form of a finished cell's record (module docstring)."""
    return {k: (v if k == "config" else _compact(v)) for k, v in record.items() if k not in DROPPED}


def committed_path(cells_dir: Path, cell_hash: str) -> Path:
    return Path(cells_dir) / f"{cell_hash}.json"


def write_committed(cells_dir: Path, record: dict) -> Path:
    """Write a finished (status ok) record to ``cells_dir/<hash>.json`` atomically; returns the path."""
    if record.get("status") != "ok":
        raise ValueError(
            f"only finished cells are committed, got status {record.get('status')!r} for "
            f"{record.get('row')} seed {record.get('seed')}"
        )
    path = committed_path(cells_dir, record["hash"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(compact(record), separators=(",", ":")) + "\n")
    tmp.replace(path)
    return path


def load_committed(cells_dir: Path | None, cell_hash: str, config: dict) -> dict | None:
    """The committed record of the cell with this hash and config, or None (absent, unreadable, failed, or recorded
    under another hash or config; such a file is left in place and overwritten when the cell finishes)."""
    if cells_dir is None:
        return None
    path = committed_path(cells_dir, cell_hash)
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if (
        not isinstance(result, dict)
        or result.get("hash") != cell_hash
        or identity_config(result.get("config") or {}) != identity_config(config)
    ):
        return None
    return result if result.get("status") == "ok" else None
