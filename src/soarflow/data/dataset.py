"""Image-caption dataset: decode, resize + center crop to the sample's bucket, optional random flip.

Items are ``{"pixel_values": (3, h, w) in [-1, 1], "caption": str, "key": str, "index": int, "flipped": bool,
"size": (h, w), "sha256": str | None}``. With bucketing, ``(h, w)`` is the bucket nearest to the image's aspect
ratio; otherwise the square ``resolution``. With ``pixels=False`` (training from a complete encoder cache) no image
is opened and items have no ``pixel_values``. :func:`collate_images` batches items; samples from different buckets (when the trainer draws
plain random batches) are brought to the batch's most common bucket with the same resize + center crop.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .buckets import make_buckets, nearest_bucket
from .records import BadSampleLog, ImageCaptionRecord


def resize_center_crop(image, height: int, width: int):
    """Resize a PIL image so it covers (height, width) (bicubic, aspect kept), then crop the center."""
    from PIL import Image

    scale = max(height / image.height, width / image.width)
    new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))


def to_tensor(image) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(image, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Decodes `records` lazily. A record whose image cannot be decoded is reported to `bad_samples` (fail:
    ValueError naming the file; skip: the next readable record stands in, so batches keep their size)."""

    def __init__(
        self,
        records: Sequence[ImageCaptionRecord],
        resolution: int,
        *,
        bucketing: bool = False,
        bucket_divisor: int = 64,
        max_aspect_ratio: float = 2.0,
        random_flip: bool = False,
        bad_samples: BadSampleLog | None = None,
        pixels: bool = True,
    ):
        if not records:
            raise ValueError("the dataset has no usable samples (all were missing, empty or unreadable)")
        self.records = list(records)
        self.resolution = resolution
        self.random_flip = random_flip
        self.bad_samples = bad_samples or BadSampleLog()
        self.buckets = (
            make_buckets(resolution, bucket_divisor, max_aspect_ratio) if bucketing else [(resolution, resolution)]
        )
        self.bucketing = bucketing
        self.pixels = pixels
        self._bucket_cache: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def bucket_of(self, index: int) -> tuple[int, int]:
        """The (h, w) of sample `index`, from the metadata size when known (else the image header)."""
        if not self.bucketing:
            return self.buckets[0]
        if index not in self._bucket_cache:
            self._bucket_cache[index] = self._find_bucket(index)
        return self._bucket_cache[index]

    def _find_bucket(self, index: int) -> tuple[int, int]:
        rec = self.records[index]
        w, h = rec.width, rec.height
        if not w or not h:
            try:
                with rec.open_image() as im:
                    w, h = im.size
            except Exception:
                return (self.resolution, self.resolution)
        return nearest_bucket(w, h, self.buckets)

    def load(self, index: int) -> dict:
        """Item `index` (no stand-in when its image is unreadable: the decoder's error is raised)."""
        from PIL import Image

        rec = self.records[index]
        if not self.pixels:
            return {
                "caption": rec.caption,
                "key": rec.key,
                "index": index,
                "flipped": False,
                "size": self.bucket_of(index),
                "sha256": rec.sha256,
            }
        with rec.open_image() as im:
            image = im.convert("RGB")
        h, w = nearest_bucket(image.width, image.height, self.buckets) if self.bucketing else self.buckets[0]
        image = resize_center_crop(image, h, w)
        flipped = self.random_flip and random.random() < 0.5
        if flipped:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return {
            "pixel_values": to_tensor(image),
            "caption": rec.caption,
            "key": rec.key,
            "index": index,
            "flipped": flipped,
            "size": (h, w),
            "sha256": rec.sha256,
        }

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self.records)):
            i = (index + attempt) % len(self.records)
            try:
                return self.load(i)
            except Exception as err:  # PIL raises many types for truncated / corrupt files
                self.bad_samples.report(self.records[i].name, f"cannot decode image ({type(err).__name__}: {err})")
        raise ValueError("no readable image in the dataset")


def collate_images(samples: Sequence[dict]) -> dict:
    """Stack items; samples whose size differs from the batch's most common size are resized + center cropped
    to it (bilinear on the tensor). Items without pixels (a complete encoder cache) keep their keys only."""
    meta = {
        k: [s[k] for s in samples] for k in ("caption", "key", "index", "flipped", "size", "sha256") if k in samples[0]
    }
    if "pixel_values" not in samples[0]:
        return meta
    sizes = Counter(tuple(s["pixel_values"].shape[-2:]) for s in samples)
    h, w = sizes.most_common(1)[0][0]
    pixels = []
    for s in samples:
        x = s["pixel_values"]
        if tuple(x.shape[-2:]) != (h, w):
            scale = max(h / x.shape[-2], w / x.shape[-1])
            size = (max(h, round(x.shape[-2] * scale)), max(w, round(x.shape[-1] * scale)))
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
            top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
            x = x[:, top : top + h, left : left + w]
        pixels.append(x)
    meta["size"] = [(h, w)] * len(samples)
    return {"pixel_values": torch.stack(pixels), **meta}
