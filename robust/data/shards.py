"""Webdataset shards: sample schema, writer and manifest (reading them back: ``robust.data.shard_reader``).

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

Decoded (``robust.data.shard_reader``) a sample is a dict ``{"__key__": str, "image": uint8 HWC RGB,
"label": int}`` plus ``"logits"``, ``"dad_image"``, ``"dad_logits"`` when stored; a row a reader cannot
use raises ``UndecodableSample``, a damaged tar stream ``DamagedShard`` (both defined here).

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
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext


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
    return ShardInfo(path.name, shard_sample_count(path), file_sha256(path))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_sample_count(path: Path) -> int:
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
