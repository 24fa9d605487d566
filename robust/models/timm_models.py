"""timm classifiers (students and small teachers) that take [0, 1] RGB input, and their export format.

Export layout (``stem`` defaults to "student"): ``<stem>.safetensors`` holds the INNER timm model's
state_dict, so ``timm.create_model(name, num_classes=..., img_size=...)`` + ``load_state_dict``
rebuilds it without this project; ``<stem>.json`` holds the timm name, classes, input size and the
mean/std the inputs must be normalised with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import timm.data
import timm.models
import torch
from torch import nn

from robust.models.normalize import NormalizedModel
from robust.models.weights import load_strict


@dataclass
class TimmConfig:
    """A timm classifier. ``None`` fields keep timm's defaults for that model."""

    name: str = "resnet50"
    num_classes: int = 1000
    pretrained: bool = False  # timm's own weights (hub download or cache); False: random init
    checkpoint: str | None = None  # .safetensors or torch file with this model's state_dict
    img_size: int | None = None  # only for models that accept it (ViTs, ...)
    drop_rate: float | None = None
    drop_path_rate: float | None = None
    in_chans: int | None = None


def build_timm(cfg: TimmConfig) -> NormalizedModel:
    """``timm.create_model`` (+ optional checkpoint) wrapped to take [0, 1] input."""
    if not timm.is_model(cfg.name):
        raise ValueError(f"unknown timm model {cfg.name!r}; pick a name from timm.list_models()")
    model = timm.create_model(
        cfg.name,
        pretrained=cfg.pretrained,
        num_classes=cfg.num_classes,
        img_size=cfg.img_size,  # timm drops None-valued kwargs, so models without img_size still build
        drop_rate=cfg.drop_rate,
        drop_path_rate=cfg.drop_path_rate,
        in_chans=cfg.in_chans,
    )
    if cfg.checkpoint:
        load_weights(model, cfg.checkpoint)
    data_cfg = timm.data.resolve_model_data_config(model)
    return NormalizedModel(model, mean=data_cfg["mean"], std=data_cfg["std"])


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state_dict file into ``model``, strictly; a ValueError names missing/unexpected keys.

    timm's loader reads .safetensors with safetensors and anything else with
    ``torch.load(weights_only=True)`` (no arbitrary unpickling), unwraps {"state_dict": ...} / EMA
    layouts and strips DDP/compile prefixes.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist; pass the path of a saved state_dict")
    try:
        state_dict = timm.models.load_state_dict(str(path), use_ema=False, weights_only=True)
    except RuntimeError as err:  # timm refuses pickled non-tensor objects (weights_only)
        raise ValueError(f"checkpoint {str(path)!r} holds more than tensors: {err}") from None
    load_strict(model, state_dict, source=f"checkpoint {str(path)!r}", hint="check the model name and num_classes")


def export_timm(model: NormalizedModel, cfg: TimmConfig, out_dir: str | Path, *, stem: str = "student") -> Path:
    """Write ``<stem>.safetensors`` (inner timm state_dict) and ``<stem>.json``; return the weights path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inner = model.model
    state_dict = {k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}
    weights = out_dir / f"{stem}.safetensors"
    safetensors.torch.save_file(state_dict, str(weights))
    meta: dict[str, Any] = {
        "timm_name": cfg.name,
        "num_classes": cfg.num_classes,
        "img_size": cfg.img_size,
        "in_chans": cfg.in_chans,
        "input_size": _input_size(inner, cfg),
        "mean": _float32_list(model.mean),
        "std": _float32_list(model.std),
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return weights


def _float32_list(t: torch.Tensor) -> list[float]:
    # str() of a numpy float32 is its shortest round-tripping form: 0.485, not 0.48500001430511475
    return [float(str(v)) for v in t.float().cpu().numpy()]


def _input_size(model: nn.Module, cfg: TimmConfig) -> list[int]:
    channels, height, width = timm.data.resolve_model_data_config(model)["input_size"]
    if cfg.img_size is not None:  # the pretrained_cfg still reports the default size
        height = width = cfg.img_size
    return [channels, height, width]


def load_exported(path: str | Path, *, stem: str = "student") -> NormalizedModel:
    """Rebuild an :func:`export_timm` model from its directory, .json or .safetensors path."""
    path = Path(path)
    base = path / stem if path.is_dir() else path.with_suffix("")
    meta_path, weights = base.with_suffix(".json"), base.with_suffix(".safetensors")
    if not meta_path.is_file() or not weights.is_file():
        raise ValueError(f"expected {meta_path} and {weights}; pass what export_timm wrote")
    meta = json.loads(meta_path.read_text())
    model = timm.create_model(
        meta["timm_name"], num_classes=meta["num_classes"], img_size=meta["img_size"], in_chans=meta["in_chans"]
    )
    load_weights(model, weights)
    return NormalizedModel(model, mean=meta["mean"], std=meta["std"])
