"""Byte-level corruptions of valid input files through the loaders: each file either loads or raises a ValueError /
FileNotFoundError that names it; nothing else escapes (no traceback from deep inside a library)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from soarflow.data.records import BadSampleLog, read_imagefolder
from soarflow.train.shapes_checkpoint import load_shapes_checkpoint
from soarflow.models.embedded import resolve_checkpoint
from soarflow.commands.eval_shapes import read_png
from soarflow.train.config import load_config

SETTINGS = dict(
    deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()
YAML = Path("configs/shapes_soar.yaml").read_bytes()
JSONL = b"".join(json.dumps({"file_name": f"{i}.png", "text": f"a red circle {i}"}).encode() + b"\n" for i in range(4))


@st.composite
def corrupted(draw, data: bytes, hot: int | None = None):
    """`data` with a few bytes replaced (mostly inside its first `hot` bytes: the header), or truncated."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        limit = len(out) - 1 if hot is None or draw(st.booleans()) is False else min(hot, len(out) - 1)
        out[draw(st.integers(0, limit))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        out = out[: draw(st.integers(0, len(out)))]
    return bytes(out)


def check(path: Path, load) -> None:
    try:
        load(path)
    except (ValueError, FileNotFoundError) as err:
        assert str(path) in str(err) or path.name in str(err), f"{type(err).__name__}: {err}"


@settings(max_examples=120, **SETTINGS)
@given(data=corrupted(PNG, hot=64))
def test_png(tmp_path, data):
    path = tmp_path / "0000_0.png"
    path.write_bytes(data)
    check(path, read_png)


@settings(max_examples=100, **SETTINGS)
@given(data=corrupted(YAML))
def test_yaml_config(tmp_path, data):
    path = tmp_path / "config.yaml"
    path.write_bytes(data)
    check(path, load_config)


@settings(max_examples=100, **SETTINGS)
@given(data=corrupted(JSONL), policy=st.sampled_from(["skip", "fail"]))
def test_jsonl_metadata(tmp_path, data, policy):
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(PNG)
    path = tmp_path / "metadata.jsonl"
    path.write_bytes(data)
    check(path, lambda p: read_imagefolder(p.parent, BadSampleLog(policy)))


@pytest.fixture(scope="module")
def base_bytes() -> bytes:
    return resolve_checkpoint("base").read_bytes()


@settings(max_examples=80, **SETTINGS)
@given(data=st.data())
def test_safetensors_model(tmp_path, base_bytes, data):
    header = 8 + int.from_bytes(base_bytes[:8], "little")
    path = tmp_path / "model.safetensors"
    path.write_bytes(data.draw(corrupted(base_bytes, hot=header)))
    check(path, load_shapes_checkpoint)
