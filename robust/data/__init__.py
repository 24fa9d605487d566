"""Data layer: webdataset shards (schema, writer, manifest, reader), image decoding, ImageFolder
conversion, digits.

The shard sample schema is documented in ``robust.data.shards``.
"""

from __future__ import annotations

from robust.data.digits import build_digits_shards, digits_arrays
from robust.data.folder import ConvertReport, class_names_of, convert_folder
from robust.data.images import UndecodableImage, decode_image
from robust.data.shard_reader import (
    ShardDataset,
    ShardTensors,
    decode_row,
    decode_sample,
    iter_raw_samples,
    load_shards,
    verify_manifest,
)
from robust.data.shards import (
    DamagedShard,
    Manifest,
    ShardInfo,
    UndecodableSample,
    index_shards,
    make_sample,
    read_manifest,
    resolve_shards,
    shard_name,
    write_manifest,
    write_shards,
)

__all__ = [
    "ConvertReport", "DamagedShard", "Manifest", "ShardDataset", "ShardInfo", "ShardTensors", "UndecodableImage",
    "UndecodableSample", "build_digits_shards", "class_names_of", "convert_folder", "decode_image", "decode_row",
    "decode_sample", "digits_arrays", "index_shards", "iter_raw_samples", "load_shards", "make_sample",
    "read_manifest", "resolve_shards", "shard_name", "verify_manifest", "write_manifest", "write_shards",
]
