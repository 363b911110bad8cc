r"""Aspect-ratio buckets: a set of (height, width) sizes of about ``resolution**2`` pixels, multiples of
``divisor``, with aspect ratios between ``1/max_ratio`` and ``max_ratio``. An image goes to the bucket whose
log aspect ratio :math:`\log(w/h)` is closest to its own, so it is cropped as little as possible."""

from __future__ import annotations

import math
from collections import defaultdict

import torch


def make_buckets(resolution: int, divisor: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Buckets (h, w), sorted by aspect ratio; always contains the square ``(resolution, resolution)``."""
    if resolution < divisor or resolution % divisor:
        raise ValueError(f"resolution {resolution} must be a positive multiple of the bucket divisor {divisor}")
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    area = resolution * resolution
    found = {(resolution, resolution)}
    h = divisor
    while h <= resolution * max_ratio:
        w = int(area / h) // divisor * divisor
        if w >= divisor and 1 / max_ratio <= w / h <= max_ratio:
            found.add((h, w))
        h += divisor
    return sorted(found, key=lambda hw: hw[1] / hw[0])


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    target = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - target))


def bucketed_batches(bucket_of: list[tuple[int, int]], batch_size: int, seed: int, epoch: int = 0) -> list[list[int]]:
    """Shuffled batches whose samples all share a bucket (incomplete batches of a bucket are dropped), in a
    random order seeded by (seed, epoch). A trainer can use these in place of plain random batches."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, b in enumerate(bucket_of):
        groups[b].append(i)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    batches = []
    for key in sorted(groups):
        idx = groups[key]
        perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        batches += [perm[s : s + batch_size] for s in range(0, len(perm) - batch_size + 1, batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[j] for j in order]
