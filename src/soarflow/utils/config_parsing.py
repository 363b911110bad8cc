"""Typed config sections: a dataclass built from a mapping (YAML or dotted command-line overrides), each value
checked against its field's type, every error naming the dotted key (with a suggestion for a misspelled one).

    section = from_dict(MySection, {"size": 5}, prefix="model")   # ValueError "unknown config key 'model.sise'..."
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")


class OverrideText(str):
    """A value typed on the command line: converted according to the target field's type."""


_NONE_WORDS = {"none", "null", "~"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert/validate `value` for type annotation `tp`; ValueError naming `key` on mismatch."""
    def bad() -> ValueError:
        return ValueError(f"config key '{key}': expected {type_name(tp)}, got {value!r} ({type(value).__name__})")

    if tp is Any:
        # Free-form sections (model/data): command-line text is read as YAML, at any nesting depth.
        if isinstance(value, OverrideText):
            return yaml.safe_load(value)
        if isinstance(value, dict):
            return {k: coerce(v, Any, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [coerce(v, Any, f"{key}[{i}]") for i, v in enumerate(value)]
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, OverrideText) and value.lower() in _NONE_WORDS):
            if type(None) in args:
                return None
            raise bad()
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ValueError:
                continue
        raise bad()
    if origin is Literal:
        if isinstance(value, OverrideText):
            value = str(value)
        if value not in args:
            raise ValueError(f"config key '{key}': must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"config key '{key}': expected a section (mapping), got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, OverrideText):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise bad()
        inner = args[0] if args else Any
        return [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if isinstance(value, OverrideText):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise bad()
        inner = args[1] if len(args) == 2 else Any
        return {k: coerce(v, inner, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, OverrideText) and value.lower() in _TRUE_WORDS | _FALSE_WORDS:
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
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in d.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ValueError(f"unknown config key '{dotted}'{hint}")
        kwargs[key] = coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except ValueError as err:
        msg = str(err)
        if prefix and "config key '" in msg and f"config key '{prefix}." not in msg:
            msg = msg.replace("config key '", f"config key '{prefix}.")
        raise ValueError(msg) from None


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, OverrideText | None]]:
    """``["--soar.num_aux", "4", "--learning_rate=1e-4", "--use_ema"]`` -> [(key, text or None)].

    A flag without a value (followed by another flag or the end) is None: True for a boolean key."""
    pairs: list[tuple[str, OverrideText | None]] = []
    items = list(overrides)
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--") or len(item) <= 2:
            raise ValueError(f"expected a --key or --key=value override, got {item!r}")
        body = item[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            pairs.append((key, OverrideText(value)))
            i += 1
        elif i + 1 < len(items) and not (items[i + 1].startswith("--") and len(items[i + 1]) > 2):
            pairs.append((body, OverrideText(items[i + 1])))
            i += 2
        else:
            pairs.append((body, None))
            i += 1
    return pairs


def set_dotted(mapping: dict[str, Any], key: str, path: Sequence[str], value: Any) -> None:
    """Set ``mapping[path[0]]...[path[-1]] = value``, creating sections; `key` names the key in errors."""
    node = mapping
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"config key '{key}': '{part}' is not a section")
        node = nxt
    node[path[-1]] = value
