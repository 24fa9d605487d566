"""The one batch schema: every column that crosses a process boundary (read tasks -> teacher pool ->
object store -> student workers, and generated shards), with its dtype and per-row shape.

Symbolic dims tie columns together: every image column of a batch has the same (H, W), every logits
column the same K, every top-k column the same k; "F" is a feature shape (any rank). ``build``
makes a batch from arrays or tensors (cast to the declared dtype, checked); ``validate`` checks one that
arrived. Rows with ``valid`` False are placeholders for samples that could not be used (undecodable,
label out of range, lost in a truncated shard): they keep the per-epoch sample count exact and carry
their key and ``skip_reason`` to the metrics; their other columns are zeros.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str  # numpy dtype name; "str" for text
    shape: tuple[str | int, ...]  # per row; str = a symbolic dim, "F" = any feature shape


KEY, EPOCH, SEED, VALID, SKIP_REASON, LABEL, TARGET = "key", "epoch", "seed", "valid", "skip_reason", "label", "target"
IMAGE, TEACHER_LOGITS = "image", "teacher_logits"
DAD_IMAGE, DAD_TEACHER_LOGITS = "dad_image", "dad_teacher_logits"
AUGMENTED, ROBUST_LOGITS, FEATS = "augmented", "robust_logits", "feats"
TEACHER_TOPK_INDEX, TEACHER_TOPK_LOGP = "teacher_topk_index", "teacher_topk_logp"
DAD_TEACHER_TOPK_INDEX, DAD_TEACHER_TOPK_LOGP = "dad_teacher_topk_index", "dad_teacher_topk_logp"

COLUMNS: dict[str, Column] = {c.name: c for c in (
    Column(KEY, "str", ()),  # the sample's key in its shard set
    Column(EPOCH, "int64", ()),
    Column(SEED, "int64", ()),  # robust.seeding.sample_seeds(run seed, epoch, key)
    Column(VALID, "bool", ()),
    Column(SKIP_REASON, "str", ()),  # "" when valid
    Column(LABEL, "int64", ()),
    Column(TARGET, "float32", ("K",)),  # soft targets (mixup / label smoothing); sum to 1
    Column(IMAGE, "uint8", ("H", "W", 3)),  # what the student sees
    Column(TEACHER_LOGITS, "float16", ("K",)),  # the teacher's logits on ``image``
    Column(DAD_IMAGE, "uint8", ("H", "W", 3)),  # DAD: Q(PGD(Q(image)))
    Column(DAD_TEACHER_LOGITS, "float16", ("K",)),
    # compact teacher targets (robust.losses.soft_targets): the classes of its k largest probabilities
    Column(TEACHER_TOPK_INDEX, "int32", ("k",)),
    # ... and their log-probabilities, largest first (float16 as the logits: float32 lowers the tau-4 KL to the
    # full teacher by about 1% at k <= 50, benchmarks/soft_targets.py)
    Column(TEACHER_TOPK_LOGP, "float16", ("k",)),
    Column(DAD_TEACHER_TOPK_INDEX, "int32", ("k",)),  # the same on ``dad_image``
    Column(DAD_TEACHER_TOPK_LOGP, "float16", ("k",)),
    Column(AUGMENTED, "bool", ()),  # RPT: ``image`` is an augmented ("unclean") sample, beta = 0 of eq. 5
    Column(ROBUST_LOGITS, "float16", ("K",)),  # RPT: the small robust teacher's logits on ``image``
    Column(FEATS, "float32", ("F",)),  # RPT feature cache: the frozen backbone on ``image``
)}
ROW_COLUMNS = (KEY, EPOCH, SEED, VALID, SKIP_REASON, LABEL)  # every batch has these
# A teacher logits column -> the columns of its compact form (its top-k classes and log-probabilities)
TOPK = {TEACHER_LOGITS: (TEACHER_TOPK_INDEX, TEACHER_TOPK_LOGP),
        DAD_TEACHER_LOGITS: (DAD_TEACHER_TOPK_INDEX, DAD_TEACHER_TOPK_LOGP)}


def _as_array(value: object, column: Column) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if column.dtype == "str":
        return np.asarray(value, dtype=str)
    array = np.asarray(value)
    if column.dtype == "uint8" and array.dtype.kind == "f":  # a cast would truncate 0.998 to 0
        raise ValueError(f"batch column {column.name!r} holds uint8 pixels; convert [0, 1] floats with "
                         "robust.train_transforms.to_uint8 first")
    return np.ascontiguousarray(array, dtype=column.dtype)


def _check(batch: Mapping[str, np.ndarray], names: Iterable[str]) -> None:
    dims: dict[str, tuple[int, ...]] = {}
    rows = None
    for name in names:
        column, array = COLUMNS[name], batch[name]
        kind_ok = array.dtype.kind in "UO" if column.dtype == "str" else array.dtype == np.dtype(column.dtype)
        if not kind_ok:
            raise ValueError(f"batch column {name!r} is {array.dtype}, the schema says {column.dtype}")
        rows = len(array) if rows is None else rows
        if len(array) != rows:
            raise ValueError(f"batch column {name!r} has {len(array)} rows, the others {rows}")
        shape = array.shape[1:]
        if column.shape == ("F",):
            expect = dims.setdefault("F", shape)
        elif len(shape) != len(column.shape):
            raise ValueError(f"batch column {name!r} has row shape {shape}, the schema says {column.shape}")
        else:
            expect = tuple(dims.setdefault(d, (s,))[0] if isinstance(d, str) else d for d, s in zip(column.shape, shape))
        if shape != expect:
            raise ValueError(f"batch column {name!r} has row shape {shape}; its schema {column.shape} binds it to "
                             f"{expect} in this batch")


def build(columns: Mapping[str, object]) -> dict[str, np.ndarray]:
    """A batch from arrays or tensors: every column known, cast to its dtype, shapes consistent."""
    unknown = sorted(set(columns) - set(COLUMNS))
    if unknown:
        raise ValueError(f"batch columns {unknown} are not in the schema (cluster/engine/batch.py)")
    batch = {name: _as_array(value, COLUMNS[name]) for name, value in columns.items()}
    _check(batch, batch)
    return batch


def validate(batch: Mapping[str, np.ndarray], *, needs: Iterable[str] = ()) -> None:
    """Raise ``ValueError`` when a column in ``needs`` (or a row column) is missing, or any known column
    has the wrong dtype or shape."""
    missing = [n for n in (*ROW_COLUMNS, *needs) if n not in batch]
    if missing:
        raise ValueError(f"the batch lacks the columns {missing}; it has {sorted(batch)}")
    _check(batch, [n for n in batch if n in COLUMNS])


def _to(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """A column on ``device``; to a GPU from pinned memory without blocking (the copy overlaps compute). Ray Data
    hands columns over from the object store read-only, and a tensor on read-only memory is undefined behaviour
    once written (torch warns): those are copied first."""
    t = torch.from_numpy(np.ascontiguousarray(array) if array.flags.writeable else np.array(array, order="C"))
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t.to(device)


def images(x_BHWC: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """An image column (uint8 HWC) -> float [0, 1] BCHW on ``device`` (converted there, from 4x fewer bytes)."""
    return _to(x_BHWC, device).permute(0, 3, 1, 2).float().div_(255)


def tensor(batch: Mapping[str, np.ndarray], name: str, device: torch.device | str) -> torch.Tensor:
    """A numeric column as a tensor on ``device``."""
    return _to(batch[name], device)


def targets(batch: Mapping[str, np.ndarray], device: torch.device | str) -> torch.Tensor:
    """Soft targets (mixup / label smoothing) when the batch carries them, else the hard labels."""
    return tensor(batch, TARGET if TARGET in batch else LABEL, device)


def compact(names: Iterable[str]) -> list[str]:
    """``names`` with each teacher logits column replaced by the columns of its top-k (``TOPK``)."""
    return [c for n in names for c in TOPK.get(n, (n,))]


def nbytes(columns: Mapping[str, tuple[int, ...]]) -> int:
    """Bytes of one row holding ``columns`` with the given row shapes (strings excluded)."""
    return sum(int(np.prod(shape)) * np.dtype(COLUMNS[n].dtype).itemsize for n, shape in columns.items()
               if COLUMNS[n].dtype != "str")

# Generated shards (offline DAD, the feature cache) store columns under the shard schema's fields
# (robust.data.shards): the image as "png", the rest as its optional fields.
SHARD_FIELDS = {IMAGE: "png", TEACHER_LOGITS: "logits.npy", DAD_IMAGE: "dad.png", DAD_TEACHER_LOGITS: "dad.logits.npy",
                ROBUST_LOGITS: "aug.logits.npy", FEATS: "feats.npy",
                TEACHER_TOPK_INDEX: "topk.index.npy", TEACHER_TOPK_LOGP: "topk.logp.npy",
                DAD_TEACHER_TOPK_INDEX: "dad.topk.index.npy", DAD_TEACHER_TOPK_LOGP: "dad.topk.logp.npy",
                TARGET: "target.npy"}
