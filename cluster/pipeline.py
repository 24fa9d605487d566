"""Ray Data wiring between shards, the teacher pool and the student pool.

online:  shards -> read tasks -> teacher pool (fresh crops and DAD samples every epoch) -> students
offline: shards -> teacher pool once -> DAD shards (images + teacher logits) -> decode tasks -> students

All epochs of a run are one stream (one Ray Data execution), so the teacher pool's actors build their
models once per run, not once per epoch (SPEC section 9). Each row carries the epoch it belongs to.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import BinaryIO
from pathlib import Path

import numpy as np
import ray
from pyarrow import fs as pafs
from ray.data import ExecutionOptions, ExecutionResources
from tqdm import tqdm
from webdataset.tariterators import group_by_keys, tar_file_expander

from robust.data.shards import (
    DAD_IMAGE, DAD_LOGITS, LOGITS, MANIFEST, Manifest, decode_image, encode_png, make_sample, parse_manifest,
    read_manifest, resolve_shards, write_shards,
)  # fmt: skip


ROWS_PER_BLOCK = 256  # rows a read task yields at a time: streaming granularity, not a sample budget


@ray.remote(num_cpus=0)
class ResumePoint:
    """The epoch the students resume at. The workers set it after restoring a checkpoint, before they
    read; the read tasks skip shards of earlier epochs, so a resumed run never reads (or sends through
    the teacher pool) an epoch it has already finished."""

    def __init__(self) -> None:
        self.epoch = 0

    def set(self, epoch: int) -> None:
        self.epoch = epoch

    def get(self) -> int:
        return self.epoch


def _is_remote(source: str) -> bool:
    return "://" in source


def shard_manifest(source: str) -> Manifest:
    """The manifest of a local shard directory or a remote one (s3://, gs://, ... via pyarrow's filesystems)."""
    if not _is_remote(source):
        return read_manifest(source)
    fs, root = pafs.FileSystem.from_uri(source)
    where = f"{source.rstrip('/')}/{MANIFEST}"
    try:
        with fs.open_input_stream(f"{root.rstrip('/')}/{MANIFEST}") as f:
            return parse_manifest(f.read().decode(), where=where)
    except (FileNotFoundError, OSError) as err:
        raise ValueError(f"cannot read {where} ({err}); write the shards with `robust-distill data convert` "
                         "and upload the directory with its manifest.json") from None


def count_samples(source: str) -> int:
    """The sample count from the shard set's manifest (needed up front: ZeRO ranks step in lock-step)."""
    return shard_manifest(source).total


def _shard_urls(source: str | list[str]) -> list[str]:
    if isinstance(source, list):  # several shard sets streamed as one (e.g. the data and its DeepAugment copy)
        return [url for s in source for url in _shard_urls(s)]
    if not _is_remote(source):
        return [str(p) for p in resolve_shards(source)]
    return [f"{source.rstrip('/')}/{s.name}" for s in shard_manifest(source).shards]


def _open(url: str) -> BinaryIO:
    if not _is_remote(url):
        return open(url, "rb")
    fs, path = pafs.FileSystem.from_uri(url)
    return fs.open_input_stream(path)


def _read_shards(items: dict[str, np.ndarray], resume: ray.actor.ActorHandle | None) -> Iterator[dict]:
    """Read task: (epoch, shard url) items -> raw webdataset rows (field -> bytes) tagged with the epoch."""
    start = ray.get(resume.get.remote()) if resume is not None else 0
    for epoch, url in zip(items["epoch"], items["url"]):
        if epoch < start:
            continue
        with _open(str(url)) as stream:
            rows: list[dict] = []
            for sample in group_by_keys(tar_file_expander([{"url": str(url), "stream": stream}])):
                rows.append(sample)
                if len(rows) == ROWS_PER_BLOCK:
                    yield _columns(rows, int(epoch))
                    rows = []
            if rows:
                yield _columns(rows, int(epoch))


def _columns(rows: list[dict], epoch: int) -> dict[str, np.ndarray]:
    fields = sorted({k for r in rows for k in r if not k.startswith("__") or k == "__key__"})
    out = {k: np.array([r.get(k) for r in rows], dtype=object) for k in fields}
    out["__key__"] = np.array([r["__key__"] for r in rows])
    out["epoch"] = np.full(len(rows), epoch, dtype=np.int64)
    return out


def read_raw(source: str | list[str], *, epochs: int = 1, shuffle: bool = True, seed: int = 0,
             resume: ray.actor.ActorHandle | None = None) -> ray.data.Dataset:
    """Raw webdataset rows (bytes per field, plus ``epoch``) of ``epochs`` passes over a shard set.

    One read task per (epoch, shard); with ``shuffle`` each epoch visits the shards in its own seeded order.
    """
    urls = _shard_urls(source)
    items = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(urls)) if shuffle else range(len(urls))
        items += [{"epoch": epoch, "url": urls[i]} for i in order]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_shards, batch_size=1, fn_kwargs={"resume": resume})


def batch_bytes(batch_size: int, crop_size: int, num_classes: int, *, with_dad: bool) -> int:
    """Object-store bytes of one teacher-pool output batch (uint8 images, fp16 logits)."""
    views = 2 if with_dad else 1
    return batch_size * views * (crop_size * crop_size * 3 + 2 * num_classes)


def execution_options(max_bytes_in_flight: int) -> ExecutionOptions:
    """Bound the object store memory Ray Data may fill ahead of the students (backpressure)."""
    return ExecutionOptions(resource_limits=ExecutionResources(object_store_memory=max_bytes_in_flight))



def _offline_samples(stream: ray.data.Dataset, total: int) -> Iterator[dict]:
    bar = tqdm(total=total, desc="offline DAD generation", unit="img")
    for batch in stream.iter_batches(batch_size=None):
        for i in np.flatnonzero(batch["valid"]):
            yield make_sample(str(batch["key"][i]), encode_png(batch["image"][i], compress_level=1),
                              int(batch["label"][i]), logits=batch["teacher_logits"][i],
                              dad_image=encode_png(batch["dad_image"][i], compress_level=1),
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
        "epoch": np.asarray(rows["epoch"]),
        "label": np.array([int(c) for c in rows["cls"]], dtype=np.int64),
        "valid": np.ones(n, dtype=bool),
        "image": np.stack([decode_image(b) for b in rows["png"]]),
        "teacher_logits": arrays(LOGITS),
        "dad_image": np.stack([decode_image(b) for b in rows[DAD_IMAGE]]),
        "dad_teacher_logits": arrays(DAD_LOGITS),
        "teacher_pid": np.zeros(n, dtype=np.int64),  # no teacher in the loop
    }


def offline_stream(shard_dir: str | Path, *, batch_size: int, epochs: int, seed: int = 0,
                   resume: ray.actor.ActorHandle | None = None) -> ray.data.Dataset:
    return read_raw(str(shard_dir), epochs=epochs, seed=seed, resume=resume).map_batches(
        decode_offline, batch_size=batch_size)
