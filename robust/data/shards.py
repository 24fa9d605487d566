"""Webdataset shards: sample schema, writer, manifest, and a torch reader.

Sample schema. A sample is the tar members that share a key (standard webdataset, so
``webdataset.WebDataset`` and ``ray.data.read_webdataset`` read it as is):

==================  ==========================================================================
field               content
==================  ==========================================================================
``__key__``         unique string id in the shard set; no "." or "/" (webdataset splits at a dot)
``png`` | ``jpg``   the image, the source's encoded bytes kept byte-for-byte (exactly one of them)
``cls``             int class label in [0, num_classes), ASCII digits
``logits.npy``      optional: teacher LOGITS for the image, float16, shape (K,)
``dad.png``         optional: the DAD image Q(x_adv) of the same sample, PNG, RGB
``dad.logits.npy``  optional: teacher LOGITS for the DAD image, float16, shape (K,)
``feats.npy``       feature cache (RPT): the frozen backbone's output for the image (then no image field)
``aug.feats.npy``   feature cache: the backbone's output for the sample's augmented view
``aug.logits.npy``  optional: teacher LOGITS for the augmented view, float16, shape (K,)
``topk.index.npy``  optional, instead of ``logits.npy``: the teacher's top-k classes, int32, shape (k,)
``topk.logp.npy``   ... and their log-probabilities, float16, shape (k,) (robust.losses.soft_targets)
``dad.topk.*.npy``  optional, instead of ``dad.logits.npy``: the same for the DAD image
==================  ==========================================================================

Decoded (``decode_sample``, ``ShardDataset``) a sample is a dict ``{"__key__": str, "image":
uint8 HWC RGB, "label": int}`` plus ``"logits"``, ``"dad_image"``, ``"dad_logits"`` when stored.
Every reader decodes a row's image and label with ``decode_row`` (pixel conversions: ``robust.data.images``);
a row it rejects raises ``UndecodableSample`` (the reader counts its key and goes on). ``iter_raw_samples``
reads one tar stream and ends a damaged one with ``DamagedShard`` after the samples before the damage.

Layout: shards ``{prefix}-{index:06d}.tar`` in one directory next to ``manifest.json``:
``{"total": N, "num_classes": K|null, "class_names": [...]|null,
"shards": [{"name": "...tar", "count": n, "sha256": "..."}]}``.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from robust.data.images import UndecodableImage, decode_image

IMAGE_FIELDS = ("png", "jpg")
LABEL = "cls"
LOGITS, DAD_IMAGE, DAD_LOGITS = "logits.npy", "dad.png", "dad.logits.npy"
FEATS, AUG_LOGITS = "feats.npy", "aug.logits.npy"
TOPK_INDEX, TOPK_LOGP = "topk.index.npy", "topk.logp.npy"
DAD_TOPK_INDEX, DAD_TOPK_LOGP = "dad.topk.index.npy", "dad.topk.logp.npy"
SOFT_TARGET = "target.npy"  # a mixed image's soft label (mixup / CutMix, label smoothing)
MANIFEST = "manifest.json"
# stored field -> decoded name, for the optional fields
_OPTIONAL = {LOGITS: "logits", DAD_IMAGE: "dad_image", DAD_LOGITS: "dad_logits", FEATS: "feats",
             AUG_LOGITS: "aug_logits", TOPK_INDEX: "topk_index", TOPK_LOGP: "topk_logp",
             DAD_TOPK_INDEX: "dad_topk_index", DAD_TOPK_LOGP: "dad_topk_logp", SOFT_TARGET: "target"}
# What np.load raises on bytes that are not a .npy array.
_NOT_NPY = (ValueError, OSError, EOFError)
# What reading a damaged tar stream raises (tarfile's errors, I/O errors of the stream, webdataset's
# ValueError for a member name that repeats within a sample).
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)
_BUILD = ("write the shard set with `robust-distill data convert IMAGEFOLDER OUT` "
          "(`robust-distill data digits OUT` for the built-in digits)")
_SHOWN = 10  # unusable samples a verify error lists
_FIX = ("re-copy the shard from where the set was written, or rebuild the set with "
        "`robust-distill data convert IMAGEFOLDER OUT`")


class UndecodableSample(ValueError):
    """A row a reader cannot use (no image, undecodable image or field, bad label); ``key`` and ``reason``
    are what a reader counts it by."""

    def __init__(self, key: str | None, reason: str) -> None:
        super().__init__(key, reason)  # args rebuild it when pickled (Ray ships errors between processes)
        self.key, self.reason = key, reason

    def __str__(self) -> str:
        return f"sample {self.key}: {self.reason}"


class DamagedShard(ValueError):
    """A tar shard that ended early or broke while being read: ``samples_read`` samples came before the
    damage; ``dropped`` is the key of the sample in progress (possibly incomplete, so not yielded)."""

    def __init__(self, url: str, samples_read: int, dropped: str | None, reason: str) -> None:
        super().__init__(url, samples_read, dropped, reason)
        self.url, self.samples_read, self.dropped, self.reason = url, samples_read, dropped, reason

    def __str__(self) -> str:
        dropped = f", dropped {self.dropped} (possibly incomplete)" if self.dropped is not None else ""
        return (f"shard {self.url} is damaged: {self.reason}; read {self.samples_read} samples before the "
                f"damage{dropped}; {_FIX}, then check it with `robust-distill data verify DIR`")


def shard_name(prefix: str, index: int) -> str:
    """The file name of shard ``index``: ``{prefix}-{index:06d}.tar``."""
    return f"{prefix}-{index:06d}.tar"


def make_sample(
    key: str,
    image: bytes,
    label: int,
    *,
    image_field: str = "png",
    logits: np.ndarray | None = None,
    dad_image: bytes | None = None,
    dad_logits: np.ndarray | None = None,
) -> dict[str, Any]:
    """A sample dict in the schema above; logits are stored as float16."""
    sample: dict[str, Any] = {"__key__": key, image_field: bytes(image), LABEL: int(label)}
    for name, value in ((LOGITS, logits), (DAD_LOGITS, dad_logits)):  # feature-cache samples: see FEATS
        if value is not None:
            sample[name] = np.asarray(value, dtype=np.float16)
    if dad_image is not None:
        sample[DAD_IMAGE] = bytes(dad_image)
    return sample


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    shards: list[ShardInfo]
    total: int
    num_classes: int | None = None
    class_names: list[str] | None = None


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | Path,
    *,
    prefix: str = "shard",
    max_per_shard: int = 1000,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Write ``samples`` (schema above) to numbered shards in ``out_dir``, then ``manifest.json``."""
    if max_per_shard < 1:
        raise ValueError(f"max_per_shard must be >= 1, got {max_per_shard}")
    num_classes, names = _classes(class_names, num_classes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_old_shards(out, prefix, overwrite=overwrite)
    keys: set[str] = set()
    infos: list[ShardInfo] = []
    it = iter(samples)
    while chunk := list(islice(it, max_per_shard)):
        for sample in chunk:
            _check_sample(sample, keys, num_classes)
        path = out / shard_name(prefix, len(infos))
        # mtime fixed: the same samples give the same bytes, hence the same sha256.
        with wds.TarWriter(str(path), mtime=0) as tar:
            for sample in chunk:
                tar.write(sample)
        infos.append(_shard_info(path))
    if not infos:
        raise ValueError(f"no samples to write to {out}; the input was empty")
    return write_manifest(out, Manifest(infos, sum(i.count for i in infos), num_classes, names))


def index_shards(
    shard_dir: str | Path, *, class_names: Sequence[str] | None = None, num_classes: int | None = None
) -> Manifest:
    """Write ``manifest.json`` for the ``*.tar`` shards already in ``shard_dir`` (e.g. written by Ray)."""
    paths = sorted(Path(shard_dir).glob("*.tar"))
    if not paths:
        raise ValueError(f"no .tar shards in {shard_dir}")
    infos = [_shard_info(p) for p in paths]
    num_classes, names = _classes(class_names, num_classes)
    return write_manifest(shard_dir, Manifest(infos, sum(i.count for i in infos), num_classes, names))


def write_manifest(shard_dir: str | Path, manifest: Manifest) -> Manifest:
    """Write ``manifest.json`` atomically (a present manifest means the shard set is complete)."""
    tmp = Path(shard_dir) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(asdict(manifest), indent=1))
    os.replace(tmp, Path(shard_dir) / MANIFEST)
    return manifest


def read_manifest(shard_dir: str | Path) -> Manifest:
    """Load ``shard_dir/manifest.json``; ValueError when the directory or its manifest is missing or malformed."""
    shard_dir = Path(shard_dir)
    if not shard_dir.exists():
        raise ValueError(f"shard directory {shard_dir} does not exist; check the path, or {_BUILD}")
    if not shard_dir.is_dir():
        raise ValueError(f"{shard_dir} is a file, not a shard directory (a directory of .tar shards with "
                         f"{MANIFEST}); {_BUILD}")
    path = shard_dir / MANIFEST
    if not path.is_file():
        raise ValueError(f"{shard_dir} has no {MANIFEST}, so it is not a complete shard set; {_BUILD}")
    return parse_manifest(path.read_text(), where=str(path))


def parse_manifest(text: str, *, where: str) -> Manifest:
    """A manifest from its JSON text; ValueError (naming ``where``) when malformed."""
    try:
        raw = json.loads(text)
        return Manifest(**{**raw, "shards": [ShardInfo(**s) for s in raw["shards"]]})
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        raise ValueError(f"{where} is not a valid shard manifest ({err}); {_BUILD}") from None


def verify_manifest(shard_dir: str | Path, *, decode: bool = False) -> Manifest:
    """Check every listed shard: present, a complete tar (end-of-archive marker), not empty, its recorded
    sample count and sha256. With ``decode`` also decode every sample (``decode_sample``, labels checked
    against the manifest's num_classes): 0.3 s for digits' 1347 train images, about 2 ms per 500x375
    JPEG on one core (some 45 CPU-minutes for ImageNet's 1.28 M).
    ValueError names the first bad shard (or, with ``decode``, the unusable samples) and the fix."""
    manifest = read_manifest(shard_dir)
    for info in manifest.shards:
        path = Path(shard_dir) / info.name
        if not path.is_file():
            raise ValueError(f"shard {path} listed in the manifest is missing; {_FIX}")
        count = _count_samples(path)
        if count != info.count:
            raise ValueError(f"shard {path} holds {count} samples, the manifest records {info.count}; {_FIX}")
        digest = _sha256(path)
        if digest != info.sha256:
            raise ValueError(f"shard {path} changed or is corrupt: sha256 {digest} != recorded {info.sha256}; {_FIX}")
    if sum(i.count for i in manifest.shards) != manifest.total:
        raise ValueError(f"manifest in {shard_dir}: shard counts do not add up to total={manifest.total}; {_BUILD}")
    if decode:
        _check_decodable(Path(shard_dir), manifest)
    return manifest


def _check_decodable(shard_dir: Path, manifest: Manifest) -> None:
    bad: list[str] = []
    for info in manifest.shards:
        path = shard_dir / info.name
        bad += [f"{info.name}: {item}" for item in _read_shard(path, expected=info.count,
                                                               num_classes=manifest.num_classes)
                if isinstance(item, (UndecodableSample, DamagedShard))]
    if bad:
        shown = "; ".join(bad[:_SHOWN])
        more = f"; ... and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
        raise ValueError(f"{len(bad)} of {manifest.total} samples in {shard_dir} cannot be used: {shown}{more}. "
                         "Readers skip them; to drop them for good rebuild the set with `robust-distill data "
                         "convert IMAGEFOLDER OUT`, which leaves out unreadable images")


def resolve_shards(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Shard paths from a shard dir (its manifest order, else sorted ``*.tar``), a ``.tar`` path, a brace
    pattern (``data-{000000..000009}.tar``) or a list of these; ValueError names a missing path."""
    items = [source] if isinstance(source, (str, Path)) else list(source)
    paths: list[Path] = []
    for item in items:
        for name in braceexpand.braceexpand(str(item)):
            path = Path(name)
            if path.is_dir():
                listed = (path / MANIFEST).is_file()
                paths += [path / i.name for i in read_manifest(path).shards] if listed else sorted(path.glob("*.tar"))
            else:
                paths.append(path)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"shard path {missing[0]} does not exist; check the data path, or {_BUILD}")
    if not paths:
        raise ValueError(f"no shards found in {source}")
    return paths


def encode_png(x_HWC: np.ndarray, *, compress_level: int = 6) -> bytes:
    """uint8 HWC RGB -> PNG bytes (PIL's default level 6; 1 for generated shards written once, read a few times)."""
    buf = io.BytesIO()
    Image.fromarray(x_HWC, "RGB").save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_row(raw: Mapping[str, Any], *, num_classes: int | None) -> tuple[np.ndarray, int]:
    """A raw row (field -> bytes; a field may be None, as in a Ray batch that mixes fields) -> (uint8 HWC
    RGB image, label). UndecodableSample when it has no image, no label or one that is not an integer in
    [0, num_classes) (``None``: any label >= 0), or an image ``decode_image`` refuses."""
    key = raw.get("__key__")
    data = next((raw[f] for f in IMAGE_FIELDS if raw.get(f) is not None), None)
    if data is None:
        raise UndecodableSample(key, f"no image field ({' or '.join(IMAGE_FIELDS)})")
    if raw.get(LABEL) is None:
        raise UndecodableSample(key, f"no label field ({LABEL})")
    label = _label(raw[LABEL])
    if label is None:
        raise UndecodableSample(key, f"label {raw[LABEL]!r} is not an integer")
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise UndecodableSample(key, f"label {label} is not in [0, {num_classes or 'K'})")
    try:
        return decode_image(data), label
    except UndecodableImage as err:
        raise UndecodableSample(key, f"undecodable image: {err}") from err


def decode_sample(raw: Mapping[str, Any], *, num_classes: int | None = None) -> dict[str, Any]:
    """A raw webdataset sample (field -> bytes) -> the decoded dict of the module docstring;
    UndecodableSample as ``decode_row``, or when a stored optional field does not decode."""
    image, label = decode_row(raw, num_classes=num_classes)
    out = {"__key__": raw["__key__"], "image": image, "label": label}
    for stored, name in _OPTIONAL.items():
        data = raw.get(stored)
        if data is None:
            continue
        try:
            out[name] = decode_image(data) if stored == DAD_IMAGE else np.load(io.BytesIO(data), allow_pickle=False)
        except (UndecodableImage, *_NOT_NPY) as err:
            raise UndecodableSample(raw["__key__"], f"undecodable {stored}: {err}") from err
    return out


def iter_raw_samples(stream: BinaryIO, *, url: str, expected: int | None = None) -> Iterator[dict[str, Any]]:
    """Raw webdataset samples (field -> bytes) of one tar stream, as webdataset groups them.

    A damaged stream (a tar error, or fewer samples than ``expected``, the count the manifest records)
    ends with ``DamagedShard`` after the samples before the damage, so a reader counts it and goes on
    with the next shard. webdataset stops silently at a cut on a member boundary or a garbled header, and
    then hands over the sample in progress as if it were whole: so the count is the only sign of those,
    and the last sample of a damaged stream is dropped (named in the error), never yielded."""
    errors: list[Exception] = []

    def stop(err: Exception) -> bool:  # webdataset's handler protocol: False ends the stream
        if not isinstance(err, _TAR_ERRORS):
            raise err
        errors.append(err)
        return False

    held: dict[str, Any] | None = None  # one sample behind: the last one is whole only if the stream is whole
    read = 0
    for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=stop), handler=stop):
        if held is not None:
            yield held
            read += 1
        held = sample
    total = read + (held is not None)
    if errors or (expected is not None and total < expected):
        # webdataset appends the stream to the error's args; the first arg is tarfile's message
        reason = (f"{type(errors[0]).__name__}: {errors[0].args[0]}" if errors
                  else f"it ends after {total} of the {expected} samples the manifest records (truncated)")
        raise DamagedShard(url, read, held["__key__"] if held is not None else None, reason)
    if held is not None:
        yield held
    if expected is not None and total > expected:
        raise DamagedShard(url, total, None, f"it holds {total} samples, the manifest records {expected}")


def _read_shard(path: Path, *, expected: int | None, num_classes: int | None
                ) -> Iterator[dict[str, Any] | UndecodableSample | DamagedShard]:
    """The one local read path: each sample of a shard decoded, or the error that rejected it, in order."""
    with path.open("rb") as stream:
        try:
            for raw in iter_raw_samples(stream, url=str(path), expected=expected):
                try:
                    yield decode_sample(raw, num_classes=num_classes)
                except UndecodableSample as err:
                    yield err
        except DamagedShard as err:
            yield err


class ShardDataset(IterableDataset):
    """Decoded samples from local shards, in order. Every process reads every shard (the cluster layer
    splits data across ranks with Ray Data); DataLoader workers split the shards among themselves.
    Unusable samples (``decode_row``; labels checked against ``num_classes`` when given) are skipped; a
    damaged shard is read up to the damage. After a pass (per worker process) ``skipped`` holds the keys
    of skipped and dropped samples, ``damaged`` one message per damaged shard."""

    def __init__(self, source: str | Path | Sequence[str | Path], *, num_classes: int | None = None) -> None:
        self.paths = resolve_shards(source)
        self.num_classes = num_classes
        self.skipped: list[str] = []
        self.damaged: list[str] = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.skipped, self.damaged = [], []
        counts = _manifest_counts(self.paths)
        for path in wds.split_by_worker(self.paths):
            for item in _read_shard(path, expected=counts.get(path), num_classes=self.num_classes):
                if isinstance(item, UndecodableSample):
                    self.skipped.append(str(item.key))
                elif isinstance(item, DamagedShard):
                    self.skipped += [item.dropped] if item.dropped is not None else []
                    self.damaged.append(str(item))
                else:
                    yield item


def _manifest_counts(paths: list[Path]) -> dict[Path, int]:
    """The sample count each shard's directory manifest records (shards without one are absent)."""
    counts: dict[Path, int] = {}
    for shard_dir in {p.parent for p in paths if (p.parent / MANIFEST).is_file()}:
        counts |= {shard_dir / i.name: i.count for i in read_manifest(shard_dir).shards}
    return counts


def _label(value: object) -> int | None:
    """The label of a ``cls`` field (the decimal text TarWriter writes, or an int before writing), else None."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (bytes, str)):
        try:
            return int(value)
        except ValueError:
            return None
    return None


@dataclass
class ShardTensors:
    x_BCHW: torch.Tensor  # float32 in [0, 1]
    y_B: torch.Tensor  # int64 labels
    keys: list[str]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # "logits" (B, K), "dad_image", "dad_logits"
    skipped: list[str] = field(default_factory=list)  # keys of unusable samples
    damaged: list[str] = field(default_factory=list)  # one message per damaged shard (read up to the damage)


def load_shards(source: str | Path | Sequence[str | Path], *, num_classes: int | None = None) -> ShardTensors:
    """Load a whole small shard set into memory as tensors (all images must share one size)."""
    dataset = ShardDataset(source, num_classes=num_classes)
    samples = list(dataset)
    if not samples:
        raise ValueError(f"no decodable samples in {source} ({len(dataset.skipped)} skipped)")
    extras = {}
    for name in _OPTIONAL.values():
        present = sum(name in s for s in samples)
        if 0 < present < len(samples):
            raise ValueError(f"{name!r} is stored in {present} of {len(samples)} samples; it must be in all or none")
        if present:
            values = [s[name] for s in samples]
            is_image = name == "dad_image"
            extras[name] = _images_to_tensor(values) if is_image else torch.from_numpy(np.stack(values)).float()
    return ShardTensors(
        x_BCHW=_images_to_tensor([s["image"] for s in samples]),
        y_B=torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        keys=[s["__key__"] for s in samples],
        extras=extras,
        skipped=dataset.skipped,
        damaged=dataset.damaged,
    )


def _images_to_tensor(images_HWC: list[np.ndarray]) -> torch.Tensor:
    shapes = {im.shape for im in images_HWC}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes {sorted(shapes)[:4]}; load_shards needs one size")
    return torch.from_numpy(np.stack(images_HWC)).permute(0, 3, 1, 2).float().div(255).contiguous()


def _classes(class_names: Sequence[str] | None, num_classes: int | None) -> tuple[int | None, list[str] | None]:
    if class_names is None:
        return num_classes, None
    if num_classes is not None and num_classes != len(class_names):
        raise ValueError(f"num_classes={num_classes} but {len(class_names)} class names were given")
    return len(class_names), list(class_names)


def _check_sample(sample: dict[str, Any], seen: set[str], num_classes: int | None) -> None:
    key = sample.get("__key__")
    if not isinstance(key, str) or not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be a non-empty string without '.' or '/'")
    if key in seen:
        raise ValueError(f"duplicate sample key {key!r}; keys must be unique in a shard set")
    seen.add(key)
    fields = set(sample) - {"__key__"}
    unknown = fields - {*IMAGE_FIELDS, LABEL, *_OPTIONAL}
    if unknown:
        raise ValueError(f"sample {key}: unknown fields {sorted(unknown)}; see robust.data.shards for the schema")
    if len(fields & {*IMAGE_FIELDS, FEATS}) != 1:
        raise ValueError(f"sample {key} needs exactly one image field out of {IMAGE_FIELDS} (or {FEATS} "
                         "for a feature-cache sample)")
    label = sample.get(LABEL)
    if not isinstance(label, (int, np.integer)) or label < 0 or (num_classes is not None and label >= num_classes):
        raise ValueError(f"sample {key}: label {label!r} is not an int in [0, {num_classes or 'K'})")
    for name in (LOGITS, DAD_LOGITS, AUG_LOGITS):
        if name in sample and getattr(sample[name], "dtype", None) != np.float16:
            raise ValueError(f"sample {key}: {name} must be a float16 numpy array (make_sample converts it)")


def _clear_old_shards(out: Path, prefix: str, *, overwrite: bool) -> None:
    old = sorted(out.glob(f"{glob.escape(prefix)}-*.tar")) + [p for p in [out / MANIFEST] if p.exists()]
    if old and not overwrite:
        raise ValueError(f"{out} already holds shards ({old[0].name}, ...); write to an empty directory, or "
                         "delete them first (write_shards(overwrite=True) replaces them)")
    for path in old:
        path.unlink()


def _shard_info(path: Path) -> ShardInfo:
    return ShardInfo(path.name, _count_samples(path), _sha256(path))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _count_samples(path: Path) -> int:
    """The samples in a tar shard, keys grouped the way webdataset groups them; ValueError for an empty,
    truncated or garbled one. Member headers only: tarfile seeks over the data."""
    if path.stat().st_size == 0:
        raise ValueError(f"shard {path} is empty (0 bytes); {_FIX}")
    try:
        with tarfile.open(path) as tar:
            keys = {base_plus_ext(name)[0] for name in tar.getnames()}
            # tarfile stops silently where the file ends on a member boundary or a header is garbled;
            # a complete tar has its end-of-archive marker (zero blocks) there.
            tar.fileobj.seek(tar.offset)
            end = tar.fileobj.read(tarfile.BLOCKSIZE)
    except tarfile.TarError as err:
        raise ValueError(f"shard {path} is truncated or not a tar file ({err}); {_FIX}") from None
    if end != bytes(tarfile.BLOCKSIZE):
        what = "ends" if len(end) < tarfile.BLOCKSIZE else "has a garbled member header"
        raise ValueError(f"shard {path} {what} at byte {tar.offset}, after {len(keys)} samples, without the "
                         f"end-of-archive marker: it is truncated or corrupt; {_FIX}")
    if not keys:
        raise ValueError(f"shard {path} holds no samples; delete it, or {_FIX}")
    return len(keys)
