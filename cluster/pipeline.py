"""Ray Data wiring between shards, the teacher pool and the student pool.

online:  shards -> read_webdataset -> teacher pool (fresh crops and DAD samples every epoch) -> students
offline: shards -> teacher pool once -> DAD shards (images + teacher logits) -> decode tasks -> students
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import ray
from PIL import Image
from ray.data import ExecutionOptions, ExecutionResources
from tqdm import tqdm

from robust.data.shards import (
    DAD_IMAGE, DAD_LOGITS, LOGITS, decode_image, make_sample, read_manifest, resolve_shards, write_shards,
)  # fmt: skip


def read_raw(source: str, *, shuffle: bool = True) -> ray.data.Dataset:
    """Raw webdataset rows (bytes per field) streamed from local or remote shard paths."""
    paths = [str(p) for p in resolve_shards(source)] if "://" not in source else source
    return ray.data.read_webdataset(paths, decoder=None, shuffle="files" if shuffle else None)


def count_samples(source: str) -> int:
    """The sample count from the shard set's manifest (needed up front: ZeRO ranks step in lock-step)."""
    if "://" in source or not Path(source).is_dir():
        raise ValueError(f"{source!r}: give a local shard directory with a manifest.json "
                         "(robust-distill data convert writes one)")
    return read_manifest(source).total


def batch_bytes(batch_size: int, crop_size: int, num_classes: int, *, with_dad: bool) -> int:
    """Object-store bytes of one teacher-pool output batch (uint8 images, fp16 logits)."""
    views = 2 if with_dad else 1
    return batch_size * views * (crop_size * crop_size * 3 + 2 * num_classes)


def execution_options(max_bytes_in_flight: int) -> ExecutionOptions:
    """Bound the object store memory Ray Data may fill ahead of the students (backpressure)."""
    return ExecutionOptions(resource_limits=ExecutionResources(object_store_memory=max_bytes_in_flight))


def _png(x_HWC: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x_HWC, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _offline_samples(stream: ray.data.Dataset, total: int) -> Iterator[dict]:
    bar = tqdm(total=total, desc="offline DAD generation", unit="img")
    for batch in stream.iter_batches(batch_size=None):
        for i in np.flatnonzero(batch["valid"]):
            yield make_sample(str(batch["key"][i]), _png(batch["image"][i]), int(batch["label"][i]),
                              logits=batch["teacher_logits"][i], dad_image=_png(batch["dad_image"][i]),
                              dad_logits=batch["dad_teacher_logits"][i])
        bar.update(len(batch["key"]))
    bar.close()


def write_offline(stream: ray.data.Dataset, out_dir: str | Path, *, total: int, num_classes: int) -> int:
    """Run the teacher pool once and write its DAD samples and soft targets as shards; returns the count.

    The driver writes (deterministic names + manifest); corrupt inputs are not written.
    """
    manifest = write_shards(_offline_samples(stream, total), out_dir, prefix="dad", num_classes=num_classes,
                            overwrite=True)
    return manifest.total


def decode_offline(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data task: offline DAD shard rows -> the teacher pool's output batch format."""

    def arrays(field: str) -> np.ndarray:
        return np.stack([np.load(io.BytesIO(b), allow_pickle=False) for b in rows[field]])

    n = len(rows["__key__"])
    return {
        "key": np.asarray(rows["__key__"]),
        "label": np.array([int(c) for c in rows["cls"]], dtype=np.int64),
        "valid": np.ones(n, dtype=bool),
        "image": np.stack([decode_image(b) for b in rows["png"]]),
        "teacher_logits": arrays(LOGITS),
        "dad_image": np.stack([decode_image(b) for b in rows[DAD_IMAGE]]),
        "dad_teacher_logits": arrays(DAD_LOGITS),
        "teacher_pid": np.zeros(n, dtype=np.int64),  # no teacher in the loop
    }


def offline_stream(shard_dir: str | Path, *, batch_size: int) -> ray.data.Dataset:
    return read_raw(str(shard_dir)).map_batches(decode_offline, batch_size=batch_size)
