"""report_to: tensorboard and wandb (offline) get the logged scalars and the validation images."""

from __future__ import annotations

import json

import pytest

from soarflow.train import load_config, train

from .test_trainer import config
from .toy_task import ToyTask


def _tensorboard_tags(logs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logs / "soarflow"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc.Tags(), acc


def _wandb_records(path):
    """The protobuf records of an offline run's ``run-*.wandb`` file: a 7-byte header (":W&B", magic, version),
    then LevelDB-log blocks of 32 KiB holding chunks (crc32 4 bytes, length 2, type 1: full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _wandb_history(run_file):
    """The run's logged history rows as nested dicts of their JSON values (a wandb.Image list is a nested key)."""
    rows = []
    for r in _wandb_records(run_file):
        if r.WhichOneof("record_type") == "history":
            row: dict = {}
            for item in r.history.item:
                *outer, last = [item.key] if item.key else list(item.nested_key)
                node = row
                for k in outer:
                    node = node.setdefault(k, {})
                node[last] = json.loads(item.value_json)
            rows.append(row)
    return rows


def test_report_to_all_logs_scalars_and_validation_images_to_tensorboard_and_offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = train(
        config(tmp_path, "run", "--report_to", "all", "--max_train_steps", "2", "--validation_steps", "2"),
        task=ToyTask(),
    )
    assert result.global_step == 2 and result.validation_images

    tags, acc = _tensorboard_tags(tmp_path / "run" / "logs")
    assert "loss" in tags["scalars"] and "lr" in tags["scalars"]
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    assert any(t.startswith("validation") for t in tags["images"]), tags["images"]

    runs = sorted((tmp_path / "wandb_home" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    (run_file,) = runs[0].glob("run-*.wandb")  # the offline run's log, what `wandb sync` uploads
    history = _wandb_history(run_file)
    losses = {row["_step"]: row["loss"] for row in history if "loss" in row}
    assert losses == pytest.approx({h["step"]: h["loss"] for h in result.history}, rel=1e-6)
    images = [row["validation"] for row in history if "validation" in row]
    assert len(images) == 1 and images[0]["_type"] == "images/separated" and images[0]["count"] == 4
    assert images[0]["captions"] == [f"sample {i}" for i in range(4)]  # the prompts of the validation grid
    pngs = sorted((runs[0] / "files" / "media" / "images").glob("validation_2_*.png"))
    assert len(pngs) == 4, pngs


def test_report_to_names_the_choices():
    with pytest.raises(ValueError, match="report_to"):
        load_config(None, ["--report_to", "mlflow"])
