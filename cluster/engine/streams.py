"""Shard streams: every epoch of a run in one Ray Data stream, decoded and prepared in the read tasks.

    shard set --read task per (epoch, shard)--> raw rows --decode each row, job's prepare--> batches

A read task reads one shard of one epoch (the epoch's shard order is seeded), decodes each row on its
own (a batch may mix PNG and JPEG; an undecodable image, a bad label or the rest of a truncated shard
becomes a placeholder row with ``valid`` False and its reason, so the epoch keeps its sample count), and
applies the job's ``Prepare`` (crops, views, mixing: CPU work that scales with the read tasks, ahead of
any teacher actor). Rows carry their epoch and their seed (``robust.seeding``). A ``ResumePoint`` lets a
resumed run skip the epochs it has finished. Generated shards (offline DAD, RPT's feature cache) hold
batch columns and are read back as they were written, or one of several versions of each sample per epoch.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import ray
from pyarrow import fs as pafs
from ray.data import ExecutionOptions, ExecutionResources
from tqdm import tqdm

from cluster.engine import batch as B
from robust.data.images import decode_image
from robust.data.shard_reader import decode_row, iter_raw_samples
from robust.data.shards import (
    LABEL as LABEL_FIELD, MANIFEST, DamagedShard, Manifest, UndecodableSample, encode_png, parse_manifest,
    read_manifest, write_shards,
)  # fmt: skip
from robust.seeding import combine, sample_seeds

ROWS_PER_BLOCK = 256  # rows a read task yields at a time: streaming granularity, not a sample budget
SKIP = "__skip__"  # a raw row's reason to be a placeholder (truncated shard)


# Restarted elsewhere when its node is lost (it may sit on any node, a student node among them): every
# attempt of the worker group sets it again before reading, so the restarted actor's fresh state is set.
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
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


def count_samples(source: str | list[str]) -> int:
    """The sample count from the manifests (needed up front: ZeRO ranks step in lock-step)."""
    return sum(shard_manifest(s).total for s in ([source] if isinstance(source, str) else source))


def _shards(source: str | list[str]) -> list[tuple[str, int]]:
    """(url, sample count) of every shard; a list streams several shard sets as one (data + DeepAugment)."""
    if isinstance(source, list):
        return [shard for s in source for shard in _shards(s)]
    manifest = shard_manifest(source)
    return [(f"{source.rstrip('/')}/{s.name}", s.count) for s in manifest.shards]


def _open(url: str) -> BinaryIO:
    if not _is_remote(url):
        return open(url, "rb")
    fs, path = pafs.FileSystem.from_uri(url)
    return fs.open_input_stream(path)


def _shard_rows(url: str, count: int) -> Iterator[dict]:
    """Exactly ``count`` (the manifest's) raw samples of one shard: after damage, placeholders that carry
    the reason; past the count, nothing (the epoch keeps the size the trainer's steps are counted on)."""
    n = 0
    try:
        with _open(url) as stream:
            for sample in iter_raw_samples(stream, url=url, expected=count):
                if n == count:
                    return
                n += 1
                yield sample
    except DamagedShard as err:
        reason = f"{Path(url).name}: {err.reason}"
    except OSError as err:  # the shard cannot be opened or read at all
        reason = f"{Path(url).name} cannot be read: {err}"
    else:
        return
    for i in range(n, count):
        yield {"__key__": f"{Path(url).stem}:missing:{i}", SKIP: reason}


def _read_shards(items: dict[str, np.ndarray], resume: ray.actor.ActorHandle | None) -> Iterator[dict]:
    """Read task: (epoch, url, count) items -> raw rows (field -> bytes), tagged with the epoch."""
    start = ray.get(resume.get.remote()) if resume is not None else 0
    for epoch, url, count in zip(items["epoch"], items["url"], items["count"]):
        if epoch < start:
            continue
        rows: list[dict] = []
        for sample in _shard_rows(str(url), int(count)):
            rows.append(sample)
            if len(rows) == ROWS_PER_BLOCK:
                yield _columns(rows, int(epoch))
                rows = []
        if rows:
            yield _columns(rows, int(epoch))


def _columns(rows: list[dict], epoch: int) -> dict[str, np.ndarray]:
    fields = sorted({k for r in rows for k in r if not k.startswith("__")})
    out = {k: np.array([r.get(k) for r in rows], dtype=object) for k in fields}
    out["__key__"] = np.array([r["__key__"] for r in rows])
    out[SKIP] = np.array([r.get(SKIP, "") for r in rows])
    out["epoch"] = np.full(len(rows), epoch, dtype=np.int64)
    return out


def read_raw(source: str | list[str], *, epochs: int = 1, shuffle: bool = True, seed: int = 0,
             resume: ray.actor.ActorHandle | None = None) -> ray.data.Dataset:
    """Raw webdataset rows (bytes per field, plus ``epoch``) of ``epochs`` passes over a shard set.

    One read task per (epoch, shard); with ``shuffle`` each epoch visits the shards in its own seeded order.
    """
    shards = _shards(source)
    items = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(shards)) if shuffle else range(len(shards))
        items += [{"epoch": epoch, "url": shards[i][0], "count": shards[i][1]} for i in order]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_shards, batch_size=1, fn_kwargs={"resume": resume})


class Prepare(Protocol):
    """A job's CPU work per batch of decoded samples: uint8 HWC images, labels, per-sample seeds, and
    which rows are real (placeholders hold a black image). Returns batch columns (``image``, ...)."""

    def __call__(self, images: list[np.ndarray], labels: np.ndarray, seeds: np.ndarray,
                 valid: np.ndarray) -> dict[str, np.ndarray]: ...


PLACEHOLDER = np.zeros((8, 8, 3), np.uint8)  # the image of a row that is not a sample


def decode_rows(rows: dict[str, np.ndarray], *, num_classes: int | None) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Each raw row on its own (``robust.data.shards.decode_row``): (images, labels, skip reasons, "" for a
    good row). A row that cannot be used becomes a placeholder: a black image, label 0, its reason."""
    images, labels, reasons = [], [], []
    fields = [f for f in rows if not f.startswith("__") and f != "epoch"]
    for i, skip in enumerate(rows[SKIP]):
        image, label, reason = PLACEHOLDER, 0, str(skip)
        if not reason:
            try:
                image, label = decode_row({"__key__": rows["__key__"][i], **{f: rows[f][i] for f in fields}},
                                          num_classes=num_classes)
            except UndecodableSample as err:
                reason = err.reason
        images.append(image)
        labels.append(label)
        reasons.append(reason)
    return images, np.array(labels, dtype=np.int64), np.array(reasons, dtype=str)


def _prepare(rows: dict[str, np.ndarray], *, prepare: Prepare, seed: int, num_classes: int | None) -> dict[str, np.ndarray]:
    images, labels, reasons = decode_rows(rows, num_classes=num_classes)
    keys, epochs = rows["__key__"].astype(str), rows["epoch"]
    seeds = sample_seeds(seed, epochs, keys)
    valid = reasons == ""
    return B.build({B.KEY: keys, B.EPOCH: epochs, B.SEED: seeds, B.VALID: valid, B.SKIP_REASON: reasons,
                    B.LABEL: labels, **prepare(images, labels, seeds, valid)})


def sample_stream(source: str | list[str], prepare: Prepare, *, epochs: int, seed: int, batch_size: int,
                  num_classes: int | None, resume: ray.actor.ActorHandle | None = None,
                  shuffle: bool = True) -> ray.data.Dataset:
    """Prepared batches of ``epochs`` passes over ``source`` (Ray Data fuses the decode into the read tasks)."""
    return read_raw(source, epochs=epochs, shuffle=shuffle, seed=seed, resume=resume).map_batches(
        _prepare, batch_size=batch_size, fn_kwargs={"prepare": prepare, "seed": seed, "num_classes": num_classes})


BLOCKS_IN_BOUND = 8  # blocks of the stream that its object-store bound holds
# Smaller objects than Ray's inline limit (max_direct_call_object_size, 100 KiB) live in their owner's heap,
# outside the object store, its bound and its stats; blocks stay above it.
MIN_BLOCK_BYTES = 128 * 2**10


def bounded(stream: ray.data.Dataset, max_bytes_in_flight: int) -> ray.data.Dataset:
    """``stream`` with blocks of about ``1 / BLOCKS_IN_BOUND`` of its object-store bound. Ray Data's
    backpressure grants budget a task at a time, and a task's output is one block up to the context's
    ``target_max_block_size`` (128 MiB): with a bound of a few such blocks every read task ran at once and
    the stream ran epochs ahead of the students (tests/test_faults.py: the teacher actors had finished all
    3 epochs before the first step)."""
    ctx = stream.context
    ctx.target_max_block_size = min(ctx.target_max_block_size or max_bytes_in_flight,
                                    max(max_bytes_in_flight // BLOCKS_IN_BOUND, MIN_BLOCK_BYTES))
    return stream


def execution_options(max_bytes_in_flight: int, *, preserve_order: bool) -> ExecutionOptions:
    """Bound the object store memory Ray Data may fill ahead of the students (backpressure); with
    ``preserve_order`` the stream (and its split among the workers) is the same on every run."""
    return ExecutionOptions(resource_limits=ExecutionResources(object_store_memory=max_bytes_in_flight),
                            preserve_order=preserve_order)


# --- generated shards: batch columns written once, read back by later epochs and runs ----------------

def _encode(column: str, value: np.ndarray) -> bytes | np.ndarray:
    """Images as PNG bytes (written once, read a few times: fast over small); arrays as they are (webdataset
    writes them as .npy)."""
    return encode_png(value, compress_level=1) if B.COLUMNS[column].dtype == "uint8" else value


def write_generated(stream: ray.data.Dataset, out_dir: Path, *, columns: list[str], total: int, desc: str,
                    num_classes: int | None) -> int:
    """Run ``stream`` once and write its valid rows' ``columns`` as shards in ``out_dir`` (fields by
    ``batch.SHARD_FIELDS``, the shard schema of robust.data.shards); returns the count."""

    def samples() -> Iterator[dict]:
        with tqdm(total=total, desc=desc, unit="img") as bar:
            for batch in stream.iter_batches(batch_size=None):
                for i in np.flatnonzero(batch[B.VALID]):
                    yield {"__key__": str(batch[B.KEY][i]), LABEL_FIELD: int(batch[B.LABEL][i]),
                           **{B.SHARD_FIELDS[c]: _encode(c, batch[c][i]) for c in columns}}
                bar.update(len(batch[B.KEY]))

    return write_shards(samples(), out_dir, prefix="gen", num_classes=num_classes, overwrite=True).total


def generated_copy_key(copy: int, key: str) -> str:
    """The key of version ``copy`` of the sample ``key`` in a generated set that holds several versions of each
    sample (e.g. the features of several epochs' augmentations); ``generated_stream(copies=...)`` reads them."""
    return f"c{copy}~{key}"


def _one_copy(keys: np.ndarray, epochs: np.ndarray, valid: np.ndarray, *, copies: int,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows to keep, their samples' keys): per sample the version drawn from (seed, epoch, key); placeholder
    rows (damaged shards) name no version and are kept."""
    parsed = [k.partition("~") for k in keys]
    names = np.array([name if sep else k for k, (_, sep, name) in zip(keys, parsed)])
    drawn = [combine([s, copies]) % copies for s in sample_seeds(seed, epochs, names)]
    keep = np.array([not v or int(c[1:]) == d for (c, _, _), v, d in zip(parsed, valid, drawn)], dtype=bool)
    return keep, names


def _decode_generated(rows: dict[str, np.ndarray], *, columns: list[str], seed: int, copies: int) -> dict[str, np.ndarray]:
    keys, epochs, valid = rows["__key__"].astype(str), rows["epoch"], rows[SKIP] == ""
    if not valid.any():
        raise ValueError(f"the generated shards of {keys[0]} are damaged ({rows[SKIP][0]}); delete their folder "
                         "and run again to regenerate them")
    keep = np.ones(len(keys), dtype=bool)
    if copies > 1:
        keep, keys = _one_copy(keys, epochs, valid, copies=copies, seed=seed)
    out: dict[str, object] = {
        B.KEY: keys, B.EPOCH: epochs, B.VALID: valid, B.SKIP_REASON: rows[SKIP], B.SEED: sample_seeds(seed, epochs, keys),
        B.LABEL: np.array([int(c) if v else 0 for c, v in zip(rows[LABEL_FIELD], valid)], dtype=np.int64)}
    first = int(np.flatnonzero(valid)[0])
    for c in columns:
        decode = decode_image if B.COLUMNS[c].dtype == "uint8" else (lambda d: np.load(io.BytesIO(d)))
        data = rows[B.SHARD_FIELDS[c]]
        like = decode(data[first])  # placeholders (and versions not read): zeros of its shape
        out[c] = np.stack([decode(d) if v and k else np.zeros_like(like) for d, v, k in zip(data, valid, keep)])
    return B.build({name: np.asarray(column)[keep] for name, column in out.items()})


def generated_stream(shard_dir: Path, *, columns: list[str], epochs: int, seed: int, batch_size: int,
                     resume: ray.actor.ActorHandle | None = None, copies: int = 1) -> ray.data.Dataset:
    """``epochs`` passes over a generated set. With ``copies`` > 1 the set holds that many versions of each
    sample (keys ``generated_copy_key(c, key)``, c < copies) and each epoch reads one version per sample,
    drawn from (seed, epoch, key); the rows carry the sample's own key."""
    return read_raw(str(shard_dir), epochs=epochs, seed=seed, resume=resume).map_batches(
        _decode_generated, batch_size=batch_size, fn_kwargs={"columns": columns, "seed": seed, "copies": copies})


def generate_once(out_dir: Path, make: Callable[[], int]) -> Path:
    """A generated shard set, made by ``make`` (which writes ``out_dir`` and returns the sample count) the
    first time only: its manifest marks it complete, so a resumed or repeated run reuses it."""
    if not (out_dir / MANIFEST).is_file():
        t0 = time.perf_counter()
        n = make()
        (out_dir / "generation.json").write_text(json.dumps({"samples": n, "seconds": time.perf_counter() - t0}))
    return out_dir
