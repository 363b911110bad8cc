"""Dataclass configs from YAML and dotted command-line overrides: the general-purpose half of the trainer's config.

What users rely on (docs/architecture.md, "Config parsing", says why no library does all of it):

* flag names are the field names (diffusers' ``--learning_rate``), sections are dotted (``--soar.num_aux 4``);
* values typed on the command line are converted by the field's type (``--use_ema`` alone is true,
  ``--max_grad_norm null``, ``--data.prompts "[a, b]"`` into a free-form section);
* every error names the dotted key, with a suggestion for a misspelt one (``did you mean 'soar.num_aux'?``);
* ``--help`` lists every key with its type, default and help (field metadata ``help``);
* renamed keys keep loading (``FORMER_KEYS`` / ``FORMER_VALUES`` of a section, with a FutureWarning);
* configs go back to plain mappings (:func:`as_dict`) for YAML and for comparing runs (:func:`config_differences`).

The schema (``TrainConfig``) lives in :mod:`soarflow.train.config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
import warnings
from typing import Any, Literal, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")


class _Text(str):
    """A value typed on the command line: converted according to the target field's type."""


_NONE_WORDS = {"none", "null", "~"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert/validate `value` for type annotation `tp`; ValueError naming `key` on mismatch."""

    def bad() -> ValueError:
        return ValueError(f"config key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")

    if tp is Any:
        # Free-form sections (model/data): command-line text is read as YAML, at any nesting depth.
        if isinstance(value, _Text):
            return yaml.safe_load(value)
        if isinstance(value, dict):
            return {k: _coerce(v, Any, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [_coerce(v, Any, f"{key}[{i}]") for i, v in enumerate(value)]
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, _Text) and value.lower() in _NONE_WORDS):
            if type(None) in args:
                return None
            raise bad()
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ValueError:
                continue
        raise bad()
    if origin is Literal:
        if isinstance(value, _Text):
            value = str(value)
        if value not in args:
            raise ValueError(f"config key '{key}': must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"config key '{key}': expected a section (mapping), got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, _Text):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise bad()
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if isinstance(value, _Text):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise bad()
        inner = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, inner, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, _Text) and value.lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.lower() in _TRUE_WORDS
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # also YAML's "1e-4", which PyYAML reads as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return str(value)
        raise bad()
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise bad()
    return value


def from_dict(cls: type[T], d: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, converting and checking each value against the field's type.

    Raises ValueError naming the dotted key (``prefix.key``) for unknown keys (with a suggestion), ill-typed
    values, and the range checks the dataclass does itself in ``__post_init__``."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        where = f"section '{prefix}'" if prefix else "the config"
        raise ValueError(f"{where}: expected a mapping of keys to values, got {type(d).__name__}")
    d = rename_former_keys(cls, d, prefix)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in _config_fields(cls)]
    set_by = {f.name: f.metadata["set_by"] for f in dataclasses.fields(cls) if "set_by" in f.metadata}
    kwargs = {}
    for key, value in d.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key in set_by:
            raise ValueError(f"config key '{dotted}' is set by the top-level key '{set_by[key]}'; set that instead")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ValueError(f"unknown config key '{dotted}'{hint}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except ValueError as err:
        msg = str(err)
        if prefix and "config key '" in msg and f"config key '{prefix}." not in msg:
            msg = msg.replace("config key '", f"config key '{prefix}.")
        raise ValueError(msg) from None


def rename_former_keys(cls: type, d: dict[str, Any], prefix: str = "", warn: bool = True) -> dict[str, Any]:
    """`d` with the former key names (``cls.FORMER_KEYS``: old -> new) and former values (``cls.FORMER_VALUES``:
    key -> {old: new}) of section `cls` replaced by the current ones, with a FutureWarning naming the new key
    (so configs and run folders written before a rename still load). Old and new key together is an error."""
    former_keys: dict[str, str] = getattr(cls, "FORMER_KEYS", {})
    former_values: dict[str, dict[str, Any]] = getattr(cls, "FORMER_VALUES", {})
    if not (former_keys or former_values) or not any(k in former_keys or k in former_values for k in d):
        return d
    dot = f"{prefix}." if prefix else ""
    out = {}
    for key, value in d.items():
        if key in former_keys:
            new = former_keys[key]
            if new in d:
                raise ValueError(f"config key '{dot}{key}' is the former name of '{dot}{new}'; set only '{dot}{new}'")
            if warn:
                warnings.warn(
                    f"config key '{dot}{key}' is now '{dot}{new}'; the old name will stop working",
                    FutureWarning,
                    stacklevel=3,
                )
            key = new
        renamed = former_values.get(key, {})
        if isinstance(value, str) and value in renamed:
            if warn:
                warnings.warn(
                    f"config key '{dot}{key}': {value!r} is now {renamed[value]!r}", FutureWarning, stacklevel=3
                )
            value = renamed[value]
        out[key] = value
    return out


def upgrade_former_names(cls: type, d: Any, prefix: str = "") -> Any:
    """:func:`rename_former_keys` through every dataclass section of `cls`, without warnings (e.g. to compare a
    run folder's config.yaml written before a rename with today's config)."""
    if not isinstance(d, dict) or not dataclasses.is_dataclass(cls):
        return d
    d = rename_former_keys(cls, d, prefix, warn=False)
    hints = typing.get_type_hints(cls)
    return {
        k: upgrade_former_names(hints[k], v, f"{prefix}.{k}" if prefix else k) if k in hints else v
        for k, v in d.items()
    }


def _config_fields(cls: type) -> list[dataclasses.Field]:
    """The fields a config file sets: init fields not filled from another key (metadata ``set_by``)."""
    return [f for f in dataclasses.fields(cls) if f.init and "set_by" not in f.metadata]


def as_dict(obj: Any) -> Any:
    """A config dataclass as a plain mapping of its keys (nested sections too), as a config file writes it."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: as_dict(getattr(obj, f.name)) for f in _config_fields(type(obj))}
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_dict(v) for v in obj]
    return obj


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, _Text | None]]:
    """``["--soar.num_aux", "4", "--learning_rate=1e-4", "--use_ema"]`` -> [(key, text or None)].

    A flag without a value (followed by another flag or the end) is None: True for a boolean key."""
    pairs: list[tuple[str, _Text | None]] = []
    items = list(overrides)
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--") or len(item) <= 2:
            raise ValueError(f"expected a --key or --key=value override, got {item!r}")
        body = item[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            pairs.append((key, _Text(value)))
            i += 1
        elif i + 1 < len(items) and not (items[i + 1].startswith("--") and len(items[i + 1]) > 2):
            pairs.append((body, _Text(items[i + 1])))
            i += 2
        else:
            pairs.append((body, None))
            i += 1
    return pairs


def field_type(root: type, path: Sequence[str]) -> Any:
    """Type annotation of the dotted key `path` in dataclass `root` (None if unknown / inside a free-form dict)."""
    tp: Any = root
    for part in path:
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def apply_overrides(
    root: type, d: dict[str, Any], overrides: Sequence[str], free_form: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A copy of the raw config mapping `d` (of dataclass `root`) with the dotted command-line overrides applied.
    Dashes in a key read as underscores, except below the `free_form` sections."""
    out = yaml.safe_load(yaml.safe_dump(d)) if d else {}
    for key, text in parse_overrides(overrides):
        free = any(key.startswith(f"{section}.") for section in free_form)
        path = key.split(".") if free else key.replace("-", "_").split(".")
        if any(not p for p in path):
            raise ValueError(f"malformed override key {key!r}")
        if text is None:
            if field_type(root, path) is not bool:
                raise ValueError(f"override --{key} needs a value")
            text = _Text("true")
        set_dotted(out, key, path, text, root)
    return out


def set_dotted(mapping: dict[str, Any], key: str, path: Sequence[str], value: Any, root: type | None = None) -> None:
    """Set ``mapping[path[0]]...[path[-1]] = value``, creating sections; `key` names the key in errors. A former
    key name (``FORMER_KEYS`` of its section in dataclass `root`) sets the current key, with a FutureWarning."""
    section = field_type(root, path[:-1]) if root is not None else None
    if path[-1] in getattr(section, "FORMER_KEYS", {}):  # overrides the current key wherever it was set
        path = [*path[:-1], section.FORMER_KEYS[path[-1]]]
        warnings.warn(
            f"config key '{key}' is now '{'.'.join(path)}'; the old name will stop working", FutureWarning, stacklevel=2
        )
    node = mapping
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"config key '{key}': '{part}' is not a section")
        node = nxt
    node[path[-1]] = value


def config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config mappings, as 'key: a -> b'."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        dotted = f"{prefix}.{key}" if prefix else str(key)
        va, vb = a.get(key, "<unset>"), b.get(key, "<unset>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, dotted)
        elif va != vb:
            out.append(f"{dotted}: {va!r} -> {vb!r}")
    return out


def describe_fields(cls: type, prefix: str = "") -> list[str]:
    """One help line per config key of dataclass `cls` (its field metadata ``help``), sections expanded."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in _config_fields(cls):
        dotted = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"  {dotted}: section — {f.metadata.get('help', '')}")
            lines += describe_fields(tp, prefix=f"{dotted}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  --{dotted:<28} {_type_name(tp):<32} default {default!r}: {f.metadata.get('help', '')}")
    return lines
