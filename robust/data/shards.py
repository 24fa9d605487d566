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
==================  ==========================================================================

Decoded (``decode_sample``, ``ShardDataset``) a sample is a dict ``{"__key__": str, "image":
uint8 HWC RGB, "label": int}`` plus ``"logits"``, ``"dad_image"``, ``"dad_logits"`` when stored.

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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset
from webdataset.tariterators import base_plus_ext

IMAGE_FIELDS = ("png", "jpg")
LABEL = "cls"
LOGITS, DAD_IMAGE, DAD_LOGITS = "logits.npy", "dad.png", "dad.logits.npy"
FEATS, AUG_FEATS, AUG_LOGITS = "feats.npy", "aug.feats.npy", "aug.logits.npy"
MANIFEST = "manifest.json"
# stored field -> decoded name, for the optional fields
_OPTIONAL = {LOGITS: "logits", DAD_IMAGE: "dad_image", DAD_LOGITS: "dad_logits", FEATS: "feats",
             AUG_FEATS: "aug_feats", AUG_LOGITS: "aug_logits"}
# What PIL / numpy raise on bytes that are not a valid image or array.
_UNDECODABLE = (OSError, ValueError, SyntaxError, EOFError, KeyError, Image.DecompressionBombError)


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
    """Load ``shard_dir/manifest.json``; ValueError when it is missing or malformed."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(f"no {MANIFEST} in {shard_dir}; write the shards with write_shards or index_shards")
    return parse_manifest(path.read_text(), where=str(path))


def parse_manifest(text: str, *, where: str) -> Manifest:
    """A manifest from its JSON text; ValueError (naming ``where``) when malformed."""
    try:
        raw = json.loads(text)
        return Manifest(**{**raw, "shards": [ShardInfo(**s) for s in raw["shards"]]})
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        raise ValueError(f"{where} is not a valid shard manifest ({err}); rebuild it with index_shards") from None


def verify_manifest(shard_dir: str | Path) -> Manifest:
    """Check every listed shard exists with its recorded sha256 and sample count; ValueError names the bad one."""
    manifest = read_manifest(shard_dir)
    for info in manifest.shards:
        path = Path(shard_dir) / info.name
        if not path.is_file():
            raise ValueError(f"shard {path} listed in the manifest is missing")
        digest = _sha256(path)
        if digest != info.sha256:
            raise ValueError(f"shard {path} changed or is corrupt: sha256 {digest} != recorded {info.sha256}")
        count = _count_samples(path)
        if count != info.count:
            raise ValueError(f"shard {path} holds {count} samples, the manifest records {info.count}")
    if sum(i.count for i in manifest.shards) != manifest.total:
        raise ValueError(f"manifest in {shard_dir}: shard counts do not add up to total={manifest.total}")
    return manifest


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
        raise ValueError(f"shard path {missing[0]} does not exist; check the data path or build the shards first")
    if not paths:
        raise ValueError(f"no shards found in {source}")
    return paths


def encode_png(x_HWC: np.ndarray, *, compress_level: int = 6) -> bytes:
    """uint8 HWC RGB -> PNG bytes (PIL's default level 6; 1 for generated shards written once, read a few times)."""
    buf = io.BytesIO()
    Image.fromarray(x_HWC, "RGB").save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 HWC RGB array (grey, palette and CMYK images are converted)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw webdataset sample (field -> bytes) -> the decoded dict of the module docstring."""
    image_field = next((f for f in IMAGE_FIELDS if f in raw), None)
    if image_field is None:
        raise KeyError(f"sample {raw.get('__key__')} has no image field ({' or '.join(IMAGE_FIELDS)})")
    out = {"__key__": raw["__key__"], "image": decode_image(raw[image_field]), "label": int(raw[LABEL])}
    for stored, name in _OPTIONAL.items():
        if stored in raw:
            data = raw[stored]
            out[name] = decode_image(data) if stored == DAD_IMAGE else np.load(io.BytesIO(data), allow_pickle=False)
    return out


class ShardDataset(IterableDataset):
    """Decoded samples from local shards, in order. Every process reads every shard (the cluster layer
    splits data across ranks with Ray Data); DataLoader workers split the shards among themselves.
    Undecodable samples are skipped; their keys are in ``skipped`` after a pass (per worker process)."""

    def __init__(self, source: str | Path | Sequence[str | Path]) -> None:
        self.paths = resolve_shards(source)
        self.skipped: list[str] = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.skipped = []
        urls = [str(p) for p in self.paths]
        for raw in wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False):
            try:
                yield decode_sample(raw)
            except _UNDECODABLE:
                self.skipped.append(str(raw.get("__key__")))


@dataclass
class ShardTensors:
    x_BCHW: torch.Tensor  # float32 in [0, 1]
    y_B: torch.Tensor  # int64 labels
    keys: list[str]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # "logits" (B, K), "dad_image", "dad_logits"
    skipped: list[str] = field(default_factory=list)  # keys of undecodable samples


def load_shards(source: str | Path | Sequence[str | Path]) -> ShardTensors:
    """Load a whole small shard set into memory as tensors (all images must share one size)."""
    dataset = ShardDataset(source)
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
        raise ValueError(f"{out} already holds shards ({old[0].name}, ...); pass overwrite=True or use an empty dir")
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
    # Member headers only (tarfile seeks over the data); keys grouped the way webdataset groups them.
    with tarfile.open(path) as tar:
        return len({base_plus_ext(name)[0] for name in tar.getnames()})
