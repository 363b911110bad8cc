"""Image-caption data for the diffusers adapters: readers (imagefolder, SOAR JSONL), aspect-ratio buckets,
resize/crop/flip, the bad-sample policy and the disk cache of encodings."""

from .buckets import bucketed_batches, make_buckets, nearest_bucket
from .cache import EncodingCache, fingerprint
from .dataset import ImageCaptionDataset, collate_images, resize_center_crop
from .records import BadSampleLog, ImageCaptionRecord, read_imagefolder, read_soar_jsonl

__all__ = [
    "BadSampleLog",
    "EncodingCache",
    "ImageCaptionDataset",
    "ImageCaptionRecord",
    "bucketed_batches",
    "collate_images",
    "fingerprint",
    "make_buckets",
    "nearest_bucket",
    "read_imagefolder",
    "read_soar_jsonl",
    "resize_center_crop",
]
