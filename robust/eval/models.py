"""Models to evaluate, named by a spec string, and the check that they fit the sets they are scored on.

spec (``NAME=`` in front picks the report name)   model
``<dir>`` | ``local-dir:<dir>``                    an export folder: timm's (``export_timm``: config.json +
                                                   model.safetensors) or RPT's (``export_rpt``: model.json +
                                                   model.safetensors), read with safetensors (never
                                                   unpickled); name: the folder's name
``timm:<name>[.<tag>]``                            ``timm.create_model(name, pretrained=True)``: timm's weights
                                                   (Hugging Face hub or its local cache); name: ``<name>[.<tag>]``
``clip:<arch>/<tag>``                              open_clip zero-shot classifier (``robust.models.clip_teacher``),
                                                   ``<tag>`` an open_clip tag or a local checkpoint file; class
                                                   names and prompts from the ``ZeroShotConfig`` given; name:
                                                   ``<arch>/<tag>``

Every model takes RGB images in [0, 1] and normalises inside.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import open_clip
import timm
import timm.models
import torch
from torch import nn

from robust.data.folder import class_names_of
from robust.data.shards import MANIFEST, read_manifest
from robust.eval.sets import EvalSet
from robust.models.clip_teacher import ClipTeacherConfig, build_clip_teacher
from robust.models.timm_models import (
    CONFIG,
    WEIGHTS,
    TimmConfig,
    build_timm,
    export_folder,
    is_timm_export,
    load_exported,
)
from robust.rpt.export import is_rpt_export, load_rpt

IMAGENET_CLASSES = 1000
# Sets scored on ImageNet-1k logits (ImageNet-R/-A and ObjectNet keep a subset of them: EvalSet.groups).
IMAGENET_KINDS = ("imagenet-c", "imagenet-sketch", "imagenet-v2", "imagenet-p")
SPEC_HELP = "an export folder (export_timm or export_rpt), timm:<name>[.<tag>] or clip:<arch>/<tag>"
RPT_META = "model.json"  # export_rpt's default stem, the one every RPT run exports with


@dataclass
class ZeroShotConfig:
    """The zero-shot head of every ``clip:`` model (its arch and weights come from the spec)."""

    class_names: list[str] = field(default_factory=list)  # empty: the 1000 ImageNet classes
    templates: list[str] = field(default_factory=list)  # "{}" marks the class; empty: the 80 OpenAI ones
    cache_dir: str = "~/.cache/robust-distill/clip"  # class-embedding matrices


@dataclass(frozen=True)
class ModelSpec:
    name: str  # in the report
    kind: str  # "export" (a timm folder) | "rpt" (an RPT folder) | "timm" | "clip" | "module" (a torch module)
    source: str  # export, rpt: the folder; timm: name[.tag]; clip: arch/tag; module: its class name
    num_classes: int | None  # None: not known before it runs (a torch module)

    @property
    def weights(self) -> str:
        """Where the weights come from, for the report."""
        if self.kind in ("export", "rpt"):
            return str(Path(self.source) / WEIGHTS)  # export_rpt names its weights the same
        return f"{self.kind}:{self.source}"


def parse_model(spec: str, *, clip: ZeroShotConfig) -> ModelSpec:
    """``[NAME=]SPEC`` -> a checked ``ModelSpec``; ValueError (saying what to pass) for a bad spec or a missing file."""
    name, sep, target = spec.partition("=")
    if not sep or any(c in name for c in "/:"):  # an "=" inside a path is not a name
        name, target = "", spec
    if target.startswith("timm:"):
        return _timm_spec(name, target.removeprefix("timm:"))
    if target.startswith("clip:"):
        return _clip_spec(name, target.removeprefix("clip:"), clip)
    return _export_spec(name, target)


def _export_spec(name: str, target: str) -> ModelSpec:
    folder = export_folder(target).resolve()
    if not folder.exists():
        raise ValueError(f"model {target!r} does not exist; pass {SPEC_HELP}")
    if is_timm_export(folder):
        kind, meta = "export", folder / CONFIG
    elif is_rpt_export(folder / RPT_META):
        kind, meta = "rpt", folder / RPT_META
    else:
        raise ValueError(f"model {target!r} is not an export folder: it must hold {CONFIG} + {WEIGHTS} "
                         f"(export_timm) or {RPT_META} + {WEIGHTS} (export_rpt); pass {SPEC_HELP}")  # fmt: skip
    num_classes = int(json.loads(meta.read_text())["num_classes"])
    return ModelSpec(name or folder.name, kind, str(folder), num_classes)


def _timm_spec(name: str, model: str) -> ModelSpec:
    if not timm.is_model(model):
        raise ValueError(f"unknown timm model {model!r}; pick a name from timm.list_pretrained()")
    try:
        pretrained = timm.models.get_pretrained_cfg(model)
    except RuntimeError:  # an unknown tag
        pretrained = None
    if pretrained is None:
        arch = model.split(".")[0]
        raise ValueError(f"timm model {model!r} has no pretrained weights; pick one of "
                         f"{timm.list_pretrained(arch + '*')[:8]}, or export your own weights")  # fmt: skip
    return ModelSpec(name or model, "timm", model, int(pretrained.num_classes))


def _clip_spec(name: str, target: str, clip: ZeroShotConfig) -> ModelSpec:
    arch, _, tag = target.partition("/")
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip arch {arch!r}; pick one of open_clip.list_models()")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag not in tags and not Path(tag).expanduser().is_file():
        raise ValueError(f"clip:{target}: {tag!r} is neither an open_clip tag of {arch} {tags} nor a checkpoint "
                         f"file; write clip:{arch}/{tags[0] if tags else 'PATH'}")  # fmt: skip
    return ModelSpec(name or target, "clip", target, len(clip.class_names) or IMAGENET_CLASSES)


def load_model(spec: ModelSpec, *, clip: ZeroShotConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The model of ``spec`` (not a "module" one: that is already loaded) on ``device``, frozen, in eval mode."""
    assert spec.kind != "module", spec
    if spec.kind == "export":
        model = load_exported(spec.source)
    elif spec.kind == "rpt":  # an RPT student predicts with eq. 6's head selection (and records it for F_correct)
        model = load_rpt(spec.source)
    elif spec.kind == "timm":
        model = build_timm(TimmConfig(name=spec.source, num_classes=spec.num_classes, pretrained=True))
    else:
        arch, _, tag = spec.source.partition("/")
        return build_clip_teacher(ClipTeacherConfig(arch=arch, pretrained=tag, **asdict(clip)), device=device)
    return model.to(device).eval().requires_grad_(False)


def param_fields(spec: ModelSpec) -> dict[str, int]:
    """``tuned_params`` / ``total_params`` of an RPT export (RPT and its baselines, Table 10)."""
    if spec.kind != "rpt":
        return {}
    counts = json.loads((Path(spec.source) / RPT_META).read_text())["param_counts"]
    return {"tuned_params": counts["tuned"], "total_params": counts["total"]}


def set_classes(eval_set: EvalSet) -> int | None:
    """How many logits a model needs for ``eval_set``; None when the set does not say (shards without manifest)."""
    cfg = eval_set.cfg
    if eval_set.groups is not None or cfg.kind in IMAGENET_KINDS:
        return IMAGENET_CLASSES
    if cfg.kind == "imagefolder":
        return len(class_names_of(cfg.root))
    if cfg.kind == "shards" and (Path(cfg.root) / MANIFEST).is_file():
        return read_manifest(cfg.root).num_classes
    return None


def check_fit(models: Sequence[ModelSpec], eval_sets: Sequence[EvalSet]) -> None:
    """ValueError when a model's class count differs from what a set needs (when both are known)."""
    for eval_set in eval_sets:
        need = set_classes(eval_set)
        wrong = [f"{m.name!r} ({m.num_classes})" for m in models
                 if None not in (need, m.num_classes) and m.num_classes != need]  # fmt: skip
        if wrong:
            raise ValueError(
                f"set {eval_set.name!r} ({eval_set.cfg.kind}) needs models with {need} classes, but "
                f"{', '.join(wrong)} differ; evaluate models trained on this set's classes, or drop the set"
            )
