"""Image-caption data: the two readers, bad-sample policy, aspect buckets, transforms, collate, cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from soarflow.data import (
    BadSampleLog,
    EncodingCache,
    ImageCaptionDataset,
    bucketed_batches,
    collate_images,
    make_buckets,
    nearest_bucket,
    read_imagefolder,
    read_soar_jsonl,
    resize_center_crop,
)


def save_image(path, h, w, value=None):
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = 255 if value is None else value  # left half white: shows flips and crops
    Image.fromarray(arr).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    save_image(root / "a.png", 40, 60)
    save_image(root / "b.png", 64, 32)
    (root / "broken.png").write_bytes(b"not an image at all")
    rows = [
        {"file_name": "a.png", "text": "a wide image"},
        {"file_name": "b.png", "text": "a tall image", "width": 32, "height": 64},
        {"file_name": "missing.png", "text": "gone"},
        {"file_name": "a.png", "text": "   "},
        {"file_name": "broken.png", "text": "corrupt"},
    ]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    return root


def test_imagefolder_reader_skips_and_names_bad_samples(folder):
    log = BadSampleLog("skip")
    recs = read_imagefolder(folder, log)
    assert [r.caption for r in recs] == ["a wide image", "a tall image", "corrupt"]
    assert (recs[1].width, recs[1].height) == (32, 64) and recs[0].width is None
    assert log.count == 3
    reasons = dict(log.skipped)
    assert reasons[str(folder / "missing.png")] == "image file is missing"
    assert reasons[str(folder / "a.png")] == "empty caption"
    assert any(name.endswith("metadata.jsonl:6") for name in reasons)
    assert "bad samples skipped: 3" in log.summary() and "missing.png" in log.summary()


def test_fail_policy_raises_with_the_file_name(folder):
    with pytest.raises(ValueError, match=r"metadata.jsonl:6: unparsable"):
        read_imagefolder(folder, BadSampleLog("fail"))
    meta = folder / "metadata.jsonl"
    meta.write_text(meta.read_text().replace("{not json\n", ""))
    with pytest.raises(ValueError, match="missing.png: image file is missing"):
        read_imagefolder(folder, BadSampleLog("fail"))
    with pytest.raises(ValueError, match="on_bad_sample"):
        BadSampleLog("ignore")
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        read_imagefolder(folder / "..", BadSampleLog())


def test_corrupt_image_is_replaced_and_counted_or_fails(folder):
    log = BadSampleLog("skip")
    recs = read_imagefolder(folder, log)
    ds = ImageCaptionDataset(recs, 32, bad_samples=log)
    item = ds[2]  # broken.png -> the next readable record stands in
    assert item["caption"] == "a wide image" and item["pixel_values"].shape == (3, 32, 32)
    assert log.count == 4 and log.skipped[-1][0].endswith("broken.png")
    strict = ImageCaptionDataset(recs, 32, bad_samples=BadSampleLog("fail"))
    with pytest.raises(ValueError, match="broken.png"):
        strict[2]


def test_soar_jsonl_reader(tmp_path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    save_image(image_dir / "abc123.jpg", 48, 32)
    rows = [
        {"md5": "abc123", "caption_en": "a tall photo", "bw": 32, "bh": 48},
        {"md5": "nope", "caption_en": "missing file", "bw": 10, "bh": 10},
        {"caption_en": "no md5"},
    ]
    jsonl = tmp_path / "soar.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    log = BadSampleLog()
    recs = read_soar_jsonl(jsonl, image_dir, log)
    assert len(recs) == 1 and recs[0].key == "abc123" and (recs[0].width, recs[0].height) == (32, 48)
    assert recs[0].image_path == image_dir / "abc123.jpg"
    assert log.count == 2 and any("nope.jpg" in n for n, _ in log.skipped)
    with pytest.raises(FileNotFoundError, match="image_dir"):
        read_soar_jsonl(jsonl, tmp_path / "none")

    pytest.importorskip("diffusers")
    from soarflow.tasks.sd3 import SD3Task

    with pytest.raises(ValueError, match="data.image_dir"):
        SD3Task.from_config({"pretrained": str(tmp_path)}, {"format": "soar_jsonl", "path": str(jsonl)})
    task = SD3Task.from_config(
        {"pretrained": str(tmp_path)},
        {"format": "soar_jsonl", "path": str(jsonl), "image_dir": str(image_dir), "resolution": 32},
    )
    ds = task.train_dataset()
    assert len(ds) == 1 and ds[0]["caption"] == "a tall photo" and ds[0]["pixel_values"].shape == (3, 32, 32)


def test_buckets_cover_the_area_and_pick_the_nearest_ratio():
    buckets = make_buckets(512, 64, 2.0)
    assert (512, 512) in buckets
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0 and 0.5 <= w / h <= 2.0
        assert 0.75 * 512**2 <= h * w <= 512**2 * 1.0001
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)
    h, w = nearest_bucket(1600, 900, buckets)
    assert w > h and abs(np.log(w / h) - np.log(16 / 9)) < 0.2
    with pytest.raises(ValueError, match="multiple"):
        make_buckets(500, 64)


def test_bucketed_batches_are_homogeneous_and_seeded():
    bucket_of = [(64, 64)] * 5 + [(32, 128)] * 4 + [(128, 32)] * 1
    batches = bucketed_batches(bucket_of, 2, seed=0)
    assert all(len({bucket_of[i] for i in b}) == 1 for b in batches)
    assert len(batches) == 4 and len({i for b in batches for i in b}) == 8
    assert batches == bucketed_batches(bucket_of, 2, seed=0)
    assert batches != bucketed_batches(bucket_of, 2, seed=0, epoch=1)


def test_resize_center_crop_and_flip(tmp_path):
    image = Image.new("RGB", (60, 40))
    out = resize_center_crop(image, 32, 32)
    assert out.size == (32, 32)
    save_image(tmp_path / "x.png", 32, 32)
    from soarflow.data import ImageCaptionRecord

    rec = ImageCaptionRecord("x.png", tmp_path / "x.png", "cap")
    plain = ImageCaptionDataset([rec], 32)[0]["pixel_values"]
    assert plain.min() == -1 and plain.max() == 1
    assert float(plain[:, :, :16].mean()) == 1.0  # left half white
    flips = ImageCaptionDataset([rec], 32, random_flip=True)
    torch.manual_seed(0)
    import random

    random.seed(0)
    seen = {bool(flips[0]["flipped"]) for _ in range(20)}
    assert seen == {True, False}
    random.seed(1)
    for _ in range(20):
        item = flips[0]
        if item["flipped"]:
            assert float(item["pixel_values"][:, :, 16:].mean()) == 1.0


def test_bucketing_dataset_and_collate_to_a_common_size(folder):
    recs = read_imagefolder(folder, BadSampleLog())[:2]
    ds = ImageCaptionDataset(recs, 32, bucketing=True, bucket_divisor=8)
    assert ds.bucket_of(0) == (24, 40)  # 60x40 is wide (size from the image header)
    assert ds.bucket_of(1) == (40, 24)  # 32x64 is tall (size from the metadata)
    a, b = ds[0], ds[1]
    assert tuple(a["pixel_values"].shape[-2:]) == ds.bucket_of(0)
    batch = collate_images([a, a, b])
    assert batch["pixel_values"].shape == (3, 3, *ds.bucket_of(0))
    assert batch["caption"] == ["a wide image", "a wide image", "a tall image"]


def test_encoding_cache_round_trip_and_fingerprint(tmp_path):
    spec = {"model": "m1", "resolution": 32}
    cache = EncodingCache(tmp_path, spec, shard_size=2)
    cache.put("a@32x32", {"x": torch.ones(2)})
    assert "a@32x32" in cache and not list(cache.dir.glob("shard-*"))
    cache.put("b@32x32", {"x": torch.zeros(2), "y": torch.arange(3)})
    assert len(list(cache.dir.glob("shard-*.safetensors"))) == 1
    cache.put("c@32x32", {"x": torch.full((2,), 5.0)})
    cache.flush()
    reopened = EncodingCache(tmp_path, spec)
    assert len(reopened) == 3
    torch.testing.assert_close(reopened.get("b@32x32")["y"], torch.arange(3))
    torch.testing.assert_close(reopened.get("c@32x32")["x"], torch.full((2,), 5.0))
    assert reopened.get("zzz") is None
    other = EncodingCache(tmp_path, {"model": "m1", "resolution": 64})
    assert other.dir != cache.dir and len(other) == 0
    with pytest.raises(ValueError, match="'/'"):
        cache.put("a/b", {"x": torch.ones(1)})


def test_task_batch_indices_group_buckets(tmp_path):
    pytest.importorskip("diffusers")
    from soarflow.tasks.sd3 import SD3Task

    root = tmp_path / "imgs"
    root.mkdir()
    rows = []
    for i, (h, w) in enumerate([(40, 60), (60, 40), (40, 60), (60, 40), (32, 32), (40, 60)]):
        save_image(root / f"{i}.png", h, w)
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows))
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    task = SD3Task.from_config(
        {"pretrained": str(pipe)}, {"path": str(root), "resolution": 32, "bucketing": True, "bucket_divisor": 8}
    )
    ds = task.train_dataset()
    batches = task.batch_indices(ds, 2, seed=0, epoch=0)
    assert len(batches) == 2  # 3 wide -> one full batch, 2 tall -> one, 1 square -> none (drop_last per bucket)
    assert all(len({ds.bucket_of(i) for i in b}) == 1 for b in batches)
    plain = SD3Task.from_config({"pretrained": str(pipe)}, {"path": str(root), "resolution": 32})
    assert plain.batch_indices(plain.train_dataset(), 2, 0, 0) is None


def test_task_counts_bad_samples_in_its_summary(folder, tmp_path):
    pytest.importorskip("diffusers")
    from soarflow.tasks.sd3 import SD3Task

    task = SD3Task.from_config({"pretrained": str(tmp_path)}, {"path": str(folder), "resolution": 32})
    ds = task.train_dataset()
    assert len(ds) == 3 and task.data_summary().startswith("bad samples skipped: 3")
    ds[2]  # broken.png, replaced by the next readable image
    assert task.data_summary().startswith("bad samples skipped: 4") and "missing.png" in task.data_summary()
    strict = SD3Task.from_config(
        {"pretrained": str(tmp_path)}, {"path": str(folder), "resolution": 32, "on_bad_sample": "fail"}
    )
    with pytest.raises(ValueError, match="metadata.jsonl:6"):
        strict.train_dataset()
