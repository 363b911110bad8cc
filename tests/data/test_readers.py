"""Every reader on files written by its own library (PIL folders, `datasets` save_to_disk / to_parquet / streaming,
webdataset's TarWriter, the SOAR JSONL): the same records, the same bad-sample policy, path escapes refused, and
the data index (sizes and hashes read once: no image is opened for bucketing on a second epoch or run)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from soarflow.data import (
    BadSampleLog,
    DataIndex,
    DataSource,
    ImageCaptionDataset,
    PathEscapeError,
    read_imagefolder,
    read_records,
    read_soar_jsonl,
)

CAPTIONS = ["a red circle", "a wide blue field", "a tall green tower"]
SIZES = [(32, 32), (48, 24), (20, 40)]  # (width, height)


def png(size, seed):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


CORRUPT = b"\x89PNG\r\n\x1a\n this is not an image"


def check(records, n=3):
    assert [r.caption for r in records] == CAPTIONS[:n]
    for rec, size in zip(records, SIZES):
        with rec.open_image() as im:
            assert im.size == size
        assert rec.image.read()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------- image folders


def test_imagefolder_with_txt_sidecars(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    for i, (cap, size) in enumerate(zip(CAPTIONS, SIZES)):
        folder = root / "sub" if i == 2 else root
        (folder / f"{i}.png").write_bytes(png(size, i))
        (folder / f"{i}.txt").write_text(cap + "\n")
    (root / "nocap.png").write_bytes(png((8, 8), 9))
    log = BadSampleLog()
    recs = read_imagefolder(root, log)
    check(recs)
    assert [r.key for r in recs] == ["0.png", "1.png", "sub/2.png"]
    assert log.count == 1 and "nocap.png" in log.skipped[0][0] and "no caption file" in log.skipped[0][1]
    with pytest.raises(ValueError, match="nocap.png: no caption file"):
        read_imagefolder(root, BadSampleLog("fail"))


def test_imagefolder_refuses_paths_leaving_the_root(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(png((8, 8), 0))
    (root / "ok.png").write_bytes(png((8, 8), 1))
    for name, pattern in [("../secret.png", "'..'"), (str(tmp_path / "secret.png"), "absolute")]:
        rows = [{"file_name": "ok.png", "text": "fine"}, {"file_name": name, "text": "escape"}]
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        for policy in ("skip", "fail"):
            with pytest.raises(PathEscapeError, match=rf"metadata.jsonl:2.*{pattern}"):
                read_imagefolder(root, BadSampleLog(policy))
    os.symlink(tmp_path / "secret.png", root / "link.png")
    rows = [{"file_name": "link.png", "text": "escape through a symlink"}]
    (root / "metadata.jsonl").write_text(json.dumps(rows[0]))
    with pytest.raises(PathEscapeError, match="metadata.jsonl:1.*symlink"):
        read_imagefolder(root, BadSampleLog())
    (root / "metadata.jsonl").unlink()  # sidecar captions: the symlinked image is refused too
    (root / "link.txt").write_text("escape")
    with pytest.raises(PathEscapeError, match="link.png.*outside the dataset root"):
        read_imagefolder(root, BadSampleLog())
    os.symlink(root / "ok.png", root / "inside.png")  # a link that stays inside the root is fine
    (root / "link.png").unlink()
    (root / "link.txt").unlink()
    (root / "inside.txt").write_text("inside")
    assert [r.key for r in read_imagefolder(root, BadSampleLog())] == ["inside.png"]


def test_soar_jsonl_refuses_md5_paths_leaving_the_image_dir(tmp_path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    (tmp_path / "x.jpg").write_bytes(png((8, 8), 0))
    jsonl = tmp_path / "soar.jsonl"
    jsonl.write_text(json.dumps({"md5": "../x", "caption_en": "escape", "bw": 8, "bh": 8}))
    with pytest.raises(PathEscapeError, match=r"soar.jsonl:1.*'\.\.'"):
        read_soar_jsonl(jsonl, image_dir)


# ------------------------------------------------------------------------------------------- Hugging Face datasets


def hf_dataset(with_corrupt=False):
    datasets = pytest.importorskip("datasets")
    rows = {"image": [{"bytes": png(s, i), "path": None} for i, s in enumerate(SIZES)], "text": list(CAPTIONS)}
    if with_corrupt:
        rows["image"].append({"bytes": CORRUPT, "path": None})
        rows["text"].append("a corrupt one")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict(rows, features=features)


def test_hf_save_to_disk(tmp_path):
    hf_dataset().save_to_disk(str(tmp_path / "saved"))
    recs = read_records(DataSource("hf_dataset", str(tmp_path / "saved")), BadSampleLog())
    check(recs)
    with pytest.raises(ValueError, match="data.caption_column.*'caption'"):
        read_records(DataSource("hf_dataset", str(tmp_path / "saved"), caption_column="caption"), BadSampleLog())
    ds = ImageCaptionDataset(recs, 16)
    assert ds[1]["pixel_values"].shape == (3, 16, 16) and ds[1]["caption"] == CAPTIONS[1]


def test_hf_parquet_and_streaming(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    hf_dataset().to_parquet(str(folder / "train-0.parquet"))
    recs = read_records(DataSource("parquet", str(folder)), BadSampleLog())
    check(recs)
    assert recs[0].key == "train-0.parquet:0:0"
    streamed = read_records(DataSource("hf_streaming", str(folder / "train-0.parquet")), BadSampleLog())
    check(streamed)
    two = read_records(DataSource("hf_streaming", str(folder), max_samples=2), BadSampleLog())
    assert [r.caption for r in two] == CAPTIONS[:2]


def test_hf_image_paths_must_stay_inside_the_dataset(tmp_path):
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "outside.png").write_bytes(png((8, 8), 0))
    folder = tmp_path / "pq"
    folder.mkdir()
    (folder / "inside.png").write_bytes(png((8, 8), 1))
    # an Image column holding paths only (no embedded bytes), as the hub's parquet files may
    image = pa.array(
        [{"bytes": None, "path": "inside.png"}, {"bytes": None, "path": "../outside.png"}],
        type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    pq.write_table(pa.table({"image": image, "text": ["inside", "outside"]}), str(folder / "p.parquet"))
    recs = read_records(DataSource("parquet", str(folder)), BadSampleLog())
    assert recs[0].image.read()[:4] == b"\x89PNG"
    with pytest.raises(PathEscapeError, match=r"p.parquet\[row group 0 row 1\].*'\.\.'"):
        recs[1].image.read()
    with pytest.raises(PathEscapeError, match="outside.png"):
        read_records(DataSource("hf_streaming", str(folder / "p.parquet")), BadSampleLog())


# ------------------------------------------------------------------------------------------------- webdataset


def write_shards(folder, with_corrupt=False):
    wds = pytest.importorskip("webdataset")
    folder.mkdir(exist_ok=True)
    samples = [{"__key__": f"s{i:03d}", "png": png(s, i), "txt": c} for i, (c, s) in enumerate(zip(CAPTIONS, SIZES))]
    if with_corrupt:
        samples.append({"__key__": "s999", "png": CORRUPT, "txt": "a corrupt one"})
        samples.append({"__key__": "s998", "txt": "no image at all"})
    for shard in range(2):
        with wds.TarWriter(str(folder / f"shard-{shard:03d}.tar")) as sink:
            for sample in samples[shard * 2 : shard * 2 + 2] if shard == 0 else samples[2:]:
                sink.write(sample)
    return folder


def test_webdataset_shards(tmp_path):
    folder = write_shards(tmp_path / "wds")
    for path in (str(folder), str(folder / "shard-{000..001}.tar"), str(folder / "*.tar")):
        recs = read_records(DataSource("webdataset", path), BadSampleLog())
        check(recs)
    assert recs[0].key == "shard-000.tar:s000" and recs[2].name.endswith("shard-001.tar:s002.png")
    ds = ImageCaptionDataset(recs, 16)
    assert ds[2]["pixel_values"].shape == (3, 16, 16)


# ---------------------------------------------------------------------- one bad-sample policy across the readers


def corrupt_sources(tmp_path):
    """Each format with the 3 good samples and a corrupt image (its header unreadable)."""
    out = {}
    folder = tmp_path / "folder"
    folder.mkdir()
    rows = []
    for i, (cap, size) in enumerate(zip(CAPTIONS + ["a corrupt one"], SIZES + [None])):
        (folder / f"{i}.png").write_bytes(png(size, i) if size else CORRUPT)
        rows.append(json.dumps({"file_name": f"{i}.png", "text": cap}))
    (folder / "metadata.jsonl").write_text("\n".join(rows))
    out["imagefolder"] = DataSource("imagefolder", str(folder))
    soar = tmp_path / "soar"
    soar.mkdir()
    lines = []
    for i, (cap, size) in enumerate(zip(CAPTIONS + ["a corrupt one"], SIZES + [None])):
        (soar / f"m{i}.jpg").write_bytes(png(size, i) if size else CORRUPT)
        lines.append(json.dumps({"md5": f"m{i}", "caption_en": cap}))
    (tmp_path / "soar.jsonl").write_text("\n".join(lines))
    out["soar_jsonl"] = DataSource("soar_jsonl", str(tmp_path / "soar.jsonl"), image_dir=str(soar))
    hf_dataset(with_corrupt=True).save_to_disk(str(tmp_path / "saved"))
    out["hf_dataset"] = DataSource("hf_dataset", str(tmp_path / "saved"))
    hf_dataset(with_corrupt=True).to_parquet(str(tmp_path / "c.parquet"))
    out["parquet"] = DataSource("parquet", str(tmp_path / "c.parquet"))
    out["hf_streaming"] = DataSource("hf_streaming", str(tmp_path / "c.parquet"))
    out["webdataset"] = DataSource("webdataset", str(write_shards(tmp_path / "wds", with_corrupt=True)))
    return out


def test_the_same_bad_sample_policy_for_every_reader(tmp_path):
    pytest.importorskip("datasets")
    pytest.importorskip("webdataset")
    for fmt, source in corrupt_sources(tmp_path).items():
        log = BadSampleLog("skip")
        indexed = DataIndex(None).update(read_records(source, log), log)
        assert [r.caption for r, _ in indexed] == CAPTIONS, fmt
        assert [(e.width, e.height) for _, e in indexed] == SIZES, fmt
        assert any("cannot read the image" in why for _, why in log.skipped), fmt
        strict = BadSampleLog("fail")
        with pytest.raises(ValueError, match="bad sample .*on_bad_sample=fail"):
            DataIndex(None).update(read_records(source, strict), strict)


# ------------------------------------------------------------------------------ the data index and bucketing


def test_sizes_are_read_once_so_bucketing_opens_no_image_later(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from soarflow.tasks.sd3 import SD3Task

    folder = write_shards(tmp_path / "wds")
    pipe = tmp_path / "pipe"
    pipe.mkdir()

    opened = []
    real_open = Image.open

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)

    def task():
        return SD3Task.from_config(
            {"pretrained": str(pipe)},
            {"format": "webdataset", "path": str(folder), "resolution": 32, "bucketing": True, "bucket_divisor": 8},
        )

    first = task()
    ds = first.train_dataset()
    first.batch_indices(ds, 1, seed=0, epoch=0)
    assert len(opened) == 3  # each image's header, once
    assert sorted({ds.bucket_of(i) for i in range(3)}) == [(24, 40), (32, 32), (40, 24)]
    opened.clear()
    first.batch_indices(ds, 1, seed=0, epoch=1)  # second epoch
    second = task()  # a later run (or another process): sizes come from the kept index
    ds2 = second.train_dataset()
    second.batch_indices(ds2, 1, seed=0, epoch=0)
    assert opened == []
    assert [ds2.bucket_of(i) for i in range(3)] == [ds.bucket_of(i) for i in range(3)]
    assert list(folder.glob(".soarflow_index-*.json"))  # kept beside the data without a cache_dir
    # a replaced image is read again (its signature changed), the others are not
    import webdataset

    with webdataset.TarWriter(str(folder / "shard-000.tar")) as sink:
        sink.write({"__key__": "s000", "png": png((24, 48), 5), "txt": CAPTIONS[0]})
        sink.write({"__key__": "s001", "png": png(SIZES[1], 1), "txt": CAPTIONS[1]})
    third = task()
    ds3 = third.train_dataset()
    assert len(opened) == 2 and ds3.bucket_of(0) == (40, 24)
