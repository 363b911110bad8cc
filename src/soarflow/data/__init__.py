"""Image-caption data for the diffusers adapters: one record interface with readers (image folders with
metadata.jsonl or .txt sidecars, the SOAR JSONL, Hugging Face datasets saved / parquet / streamed, webdataset
shards), the data index (sizes and hashes read once), aspect-ratio buckets, resize/crop/flip, the bad-sample
policy, and the encoder cache with the code that fills it before training."""

from .buckets import bucketed_batches, make_buckets, nearest_bucket
from .cache import CACHE_DTYPES, CorruptEntry, EncodingCache, fingerprint, latent_key, text_key
from .dataset import ImageCaptionDataset, collate_images, resize_center_crop
from .index import DataIndex, IndexEntry, source_id
from .records import (
    IMAGE_FORMATS,
    BadSampleLog,
    DataSource,
    FileImage,
    ImageCaptionRecord,
    InMemoryImage,
    PathEscapeError,
    TarMember,
    read_imagefolder,
    read_records,
    read_sidecar_folder,
    read_soar_jsonl,
)

__all__ = [
    "BadSampleLog",
    "CACHE_DTYPES",
    "CorruptEntry",
    "DataIndex",
    "DataSource",
    "EncodingCache",
    "FileImage",
    "IMAGE_FORMATS",
    "ImageCaptionDataset",
    "ImageCaptionRecord",
    "InMemoryImage",
    "IndexEntry",
    "PathEscapeError",
    "TarMember",
    "bucketed_batches",
    "collate_images",
    "fingerprint",
    "latent_key",
    "make_buckets",
    "nearest_bucket",
    "read_imagefolder",
    "read_records",
    "read_sidecar_folder",
    "read_soar_jsonl",
    "resize_center_crop",
    "source_id",
    "text_key",
]
