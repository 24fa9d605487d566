"""Evaluation sets in their standard layouts, built from an ``EvalSetConfig``, and on-the-fly "X-C".

Every loader yields uint8 CHW RGB images (exact, and 4x smaller than float between processes);
``to_unit`` makes them [0, 1] floats. Clean sets are resized (short side to image_size / crop_pct)
and center-cropped; ImageNet-C is used as stored (already 224 px; the official DAD code resized and
cropped it again, which changes the benchmark).

kind              layout under root                          sample
imagefolder       <class>/<img>                              (x, label); classes sorted, numerically when all
                                                             names are integers (as robust.data.folder)
imagenet-c        <corruption>/<1..5>/<wnid>/<img>           (x, label, corruption, severity)
imagenet-r, -a    <wnid>/<img>                               (x, position in the 200-class subset)
imagenet-sketch   <wnid>/<img>                               (x, ImageNet-1k index)
imagenet-v2       <0..999>/<img>                             (x, int(folder)): the folder name is the index
objectnet         [images/]<objectnet folder>/<img>          (x, position among the 113 ImageNet-overlap classes)
imagenet-p        <perturbation>/<wnid>/<sequence>.npy       (x_TCHW, label, perturbation)
shards            webdataset shards (robust.data.shards)     (x, label)

ImageNet-P ships as .mp4 videos (<perturbation>/<wnid>/<name>.mp4). Here each sequence is one .npy
uint8 array (T, H, W, 3): lossless, readable with numpy alone (no video codec in the dependencies),
memory-mappable, and one file per sequence keeps frame order and sequence identity. Convert once,
e.g. with OpenCV: read the frames of each .mp4 as RGB and ``np.save`` the stacked array.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import ImageNetInfo
from torch.utils.data import Dataset, IterableDataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from robust.data.folder import class_names_of
from robust.data.shard_reader import ShardDataset
from robust.eval.class_subsets import IMAGENET_A_INDICES, IMAGENET_R_INDICES, OBJECTNET_GROUPS
from robust.eval.corruptions import ALL, IMAGENET_C, corrupt

Groups = tuple[tuple[int, ...], ...]
UNLABELLED_KINDS = ("imagenet-c", "imagenet-p")  # no clean accuracy: never the in-distribution set


@dataclass
class EvalSetConfig:
    """One evaluation set. Mark the in-distribution test set ``shifted: false``: its accuracy is the
    report's clean accuracy, and on it F_correct counts the clean head as right."""

    kind: str = "imagefolder"
    root: str = ""  # folder, or for kind=shards a shard dir / .tar / brace pattern
    name: str = ""  # name in the report; defaults to kind
    shifted: bool = True  # False only for the in-distribution test set; its X-C is shifted all the same
    image_size: int = 224
    crop_pct: float = 0.875  # resize the short side to image_size / crop_pct, then center-crop
    corruptions: list[str] = field(default_factory=list)  # on-the-fly X-C of this set; ["all"] = the 15
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    perturbation_step: int = 1  # ImageNet-P: frames compared this far apart (non-noise perturbations)


@dataclass
class EvalSet:
    cfg: EvalSetConfig
    dataset: Dataset | IterableDataset
    groups: Groups | None = None  # logits kept (max over each group) for class-subset sets

    @property
    def name(self) -> str:
        return self.cfg.name or self.cfg.kind

    @property
    def corruptions(self) -> tuple[str, ...]:
        return IMAGENET_C if self.cfg.corruptions == ["all"] else tuple(self.cfg.corruptions)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; float images pass through."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def corrupted_batches(
    batches: Iterable[tuple[torch.Tensor, ...]],
    *,
    corruptions: Iterable[str] = IMAGENET_C,
    severities: Iterable[int] = (1, 2, 3, 4, 5),
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, str, int]]:
    """X-C of any set: for each batch (x, y, ...) yield (corrupt(x, c, s), y, c, s) for every (c, s)."""
    corruptions, severities = tuple(corruptions), tuple(severities)
    for x_BCHW, y_B, *_ in batches:
        x_BCHW = to_unit(x_BCHW)
        for c in corruptions:
            for s in severities:
                yield corrupt(x_BCHW, c, s, generator=generator), y_B, c, s


class ImageFiles(Dataset):
    """Image files with labels: item i is (transform(RGB image), label, *extras)."""

    def __init__(self, samples: list[tuple[Path, int, tuple[Any, ...]]], transform: Callable) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        path, label, extras = self.samples[i]
        with Image.open(path) as im:
            return (self.transform(im.convert("RGB")), label, *extras)


class SequenceFiles(Dataset):
    """ImageNet-P sequences stored as .npy uint8 (T, H, W, 3): item i is (x_TCHW, label, perturbation)."""

    def __init__(self, samples: list[tuple[Path, int, tuple[Any, ...]]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        path, label, (perturbation,) = self.samples[i]
        frames = np.load(path, allow_pickle=False)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"{path}: expected a uint8 array (T, H, W, 3), found {frames.dtype} {frames.shape}")
        return torch.from_numpy(frames).permute(0, 3, 1, 2), label, perturbation


class ShardImages(IterableDataset):
    """Webdataset shards (robust.data.shards) as (transform(image), label)."""

    def __init__(self, source: str, transform: Callable) -> None:
        self.shards, self.transform = ShardDataset(source), transform

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        for sample in self.shards:
            # a copy: decoded arrays can be read-only
            yield self.transform(torch.tensor(sample["image"]).permute(2, 0, 1)), sample["label"]


def resize_crop(cfg: EvalSetConfig) -> v2.Compose:
    """The clean-set preprocessing on uint8 tensors: short side to image_size / crop_pct (rounded down,
    as timm's eval transform), bilinear, then center crop."""
    short_side = math.floor(cfg.image_size / cfg.crop_pct)
    return v2.Compose([v2.Resize(short_side, antialias=True), v2.CenterCrop(cfg.image_size)])


def timm_data_config(cfg: EvalSetConfig) -> dict[str, Any]:
    """``resize_crop``'s preprocessing in timm's data-config keys (``timm.data.create_transform`` makes the
    same resize and crop), for an export's pretrained_cfg."""
    return {"input_size": (3, cfg.image_size, cfg.image_size), "crop_pct": cfg.crop_pct,
            "interpolation": "bilinear", "crop_mode": "center"}  # fmt: skip


def clean_transform(cfg: EvalSetConfig) -> v2.Compose:
    return v2.Compose([v2.PILToTensor(), resize_crop(cfg)])


def _crop_objectnet_border(im: Image.Image) -> Image.Image:
    # ObjectNet images carry a 1-px red border; the standard evaluation crops 2 px on each side.
    return im.crop((2, 2, im.width - 2, im.height - 2))


def _layout_error(cfg: EvalSetConfig, expected: str, found: str) -> ValueError:
    return ValueError(f"{cfg.kind} set at {cfg.root}: expected the layout {expected}; found {found}")


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files(folder: Path, suffixes: tuple[str, ...] = IMG_EXTENSIONS) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and not p.name.startswith("."))


def _listing(path: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return f"{names[:5]}{' ...' if len(names) > 5 else ''}" if names else "an empty folder"


def _labelled(cfg: EvalSetConfig, root: Path, label_of: dict[str, int], expected: str, extras: tuple = ()) -> list:
    """Files of every class folder under ``root`` named in ``label_of``; ValueError on a foreign folder."""
    dirs = _subdirs(root)
    foreign = [d.name for d in dirs if d.name not in label_of]
    if not dirs or foreign:
        raise _layout_error(cfg, expected, f"{foreign[:5]} in {root}" if foreign else _listing(root))
    samples = [(path, label_of[d.name], extras) for d in dirs for path in _files(d)]
    if not samples:
        raise _layout_error(cfg, expected, f"no image files under the class folders of {root}")
    return samples


def _wnid_index() -> dict[str, int]:
    return {wnid: i for i, wnid in enumerate(ImageNetInfo("imagenet-1k").label_names())}


def _subset_set(cfg: EvalSetConfig, indices: tuple[int, ...]) -> EvalSet:
    position = {i: k for k, i in enumerate(indices)}
    label_of = {wnid: position[i] for wnid, i in _wnid_index().items() if i in position}
    samples = _labelled(cfg, Path(cfg.root), label_of, "root/<wnid>/<image> with the subset's wnids")
    return EvalSet(cfg, ImageFiles(samples, clean_transform(cfg)), tuple((i,) for i in indices))


def _imagefolder(cfg: EvalSetConfig) -> EvalSet:
    root = Path(cfg.root)
    label_of = {name: k for k, name in enumerate(class_names_of(root))}
    return EvalSet(cfg, ImageFiles(_labelled(cfg, root, label_of, "root/<class>/<image>"), clean_transform(cfg)))


def _sketch(cfg: EvalSetConfig) -> EvalSet:
    samples = _labelled(cfg, Path(cfg.root), _wnid_index(), "root/<wnid>/<image> (ImageNet wnids)")
    return EvalSet(cfg, ImageFiles(samples, clean_transform(cfg)))


def _v2(cfg: EvalSetConfig) -> EvalSet:
    # Folder "k" holds class k: map by the number, never by string order ("10" < "2").
    label_of = {str(k): k for k in range(1000)}
    samples = _labelled(cfg, Path(cfg.root), label_of, "root/<0..999>/<image> (folder name = class index)")
    return EvalSet(cfg, ImageFiles(samples, clean_transform(cfg)))


def _objectnet(cfg: EvalSetConfig) -> EvalSet:
    root = Path(cfg.root)
    root = root / "images" if (root / "images").is_dir() else root
    names = sorted(OBJECTNET_GROUPS)
    dirs = {d.name for d in _subdirs(root)}
    if not dirs & set(names):
        expected = "root/[images/]<objectnet folder, e.g. alarm_clock>/<image>"
        raise _layout_error(cfg, expected, _listing(root))
    # ObjectNet's other 200 classes have no ImageNet counterpart: they are not scored.
    label_of = {name: k for k, name in enumerate(names)}
    samples = [(p, label_of[name], ()) for name in names if name in dirs for p in _files(root / name)]
    transform = v2.Compose([_crop_objectnet_border, clean_transform(cfg)])
    return EvalSet(cfg, ImageFiles(samples, transform), tuple(OBJECTNET_GROUPS[n] for n in names))


def _imagenet_c(cfg: EvalSetConfig) -> EvalSet:
    root, wnids = Path(cfg.root), _wnid_index()
    expected = "root/<corruption>/<1..5>/<wnid>/<image>"
    corruption_dirs = _subdirs(root)
    unknown = [d.name for d in corruption_dirs if d.name not in ALL]
    if not corruption_dirs or unknown:
        raise _layout_error(cfg, expected, f"non-corruption folders {unknown[:5]}" if unknown else _listing(root))
    samples = []
    for cdir in corruption_dirs:
        severity_dirs = _subdirs(cdir)
        if not severity_dirs or any(d.name not in {"1", "2", "3", "4", "5"} for d in severity_dirs):
            raise _layout_error(cfg, expected, f"{_listing(cdir)} in {cdir}")
        for sdir in severity_dirs:
            samples += _labelled(cfg, sdir, wnids, expected, (cdir.name, int(sdir.name)))
    return EvalSet(cfg, ImageFiles(samples, v2.PILToTensor()))


def _imagenet_p(cfg: EvalSetConfig) -> EvalSet:
    root, wnids = Path(cfg.root), _wnid_index()
    expected = "root/<perturbation>/<wnid>/<sequence>.npy, each a uint8 array (T, H, W, 3)"
    samples = []
    for pdir in _subdirs(root):
        class_dirs = _subdirs(pdir)
        if not class_dirs or any(d.name not in wnids for d in class_dirs):
            raise _layout_error(cfg, expected, f"{_listing(pdir)} in {pdir}")
        samples += [(f, wnids[d.name], (pdir.name,)) for d in class_dirs for f in _files(d, (".npy",))]
    if not samples:
        raise _layout_error(cfg, expected, _listing(root))
    return EvalSet(cfg, SequenceFiles(samples))


def _shards(cfg: EvalSetConfig) -> EvalSet:
    return EvalSet(cfg, ShardImages(cfg.root, resize_crop(cfg)))


BUILDERS: dict[str, Callable[[EvalSetConfig], EvalSet]] = {
    "imagefolder": _imagefolder,
    "imagenet-c": _imagenet_c,
    "imagenet-r": lambda cfg: _subset_set(cfg, IMAGENET_R_INDICES),
    "imagenet-a": lambda cfg: _subset_set(cfg, IMAGENET_A_INDICES),
    "imagenet-sketch": _sketch,
    "imagenet-v2": _v2,
    "objectnet": _objectnet,
    "imagenet-p": _imagenet_p,
    "shards": _shards,
}


def build_eval_set(cfg: EvalSetConfig) -> EvalSet:
    """The evaluation set ``cfg`` describes; ValueError for an unknown kind, a missing root or a wrong layout."""
    if cfg.kind not in BUILDERS:
        raise ValueError(f"unknown eval set kind {cfg.kind!r}; choose one of {sorted(BUILDERS)}")
    if cfg.kind != "shards" and not Path(cfg.root).is_dir():
        raise ValueError(f"{cfg.kind} set root {cfg.root!r} is not a folder; set root to the data set's folder")
    unknown = [c for c in cfg.corruptions if c not in ALL] if cfg.corruptions != ["all"] else []
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; choose from {list(ALL)} or ['all']")
    if not cfg.severities or any(s not in (1, 2, 3, 4, 5) for s in cfg.severities):
        raise ValueError(f"severities must be a non-empty subset of 1..5, got {cfg.severities}")
    if cfg.kind in UNLABELLED_KINDS and not cfg.shifted:
        raise ValueError(f"{cfg.kind} is shifted data and cannot be the in-distribution test set; "
                         "leave shifted at true and mark the clean test set shifted: false")  # fmt: skip
    return BUILDERS[cfg.kind](cfg)


def in_distribution(eval_sets: Sequence[EvalSet]) -> EvalSet:
    """The in-distribution test set: the one set with ``shifted: false``; ValueError unless exactly one is."""
    clean = [s for s in eval_sets if not s.cfg.shifted]
    if len(clean) != 1:
        raise ValueError(f"{len(clean)} sets are marked shifted: false ({[s.name for s in clean]}); mark exactly "
                         "one, the in-distribution test set, whose accuracy is the clean accuracy")  # fmt: skip
    return clean[0]
