"""timm classifiers (students and small teachers) that take [0, 1] RGB input, and their export format.

An export is timm's own folder (``timm.models.save_for_hf``): ``config.json`` holds the architecture,
``num_classes``, the arguments that rebuild it (``model_args``, e.g. a ViT's ``img_size``) and a
``pretrained_cfg`` with the mean/std, input size, crop and interpolation the model was trained and
evaluated with; ``model.safetensors`` holds the inner timm model's state_dict. Without this project::

    model = timm.create_model("local-dir:<folder>", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))

and ``timm.models.push_to_hf_hub`` uploads the same folder. The exported model takes normalised input
like every timm model; ``load_exported`` wraps it to take [0, 1] input like every model here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import timm.data
import timm.models
import torch
from torch import nn

from robust.models.normalize import NormalizedModel
from robust.models.weights import load_strict

CONFIG, WEIGHTS = "config.json", "model.safetensors"  # the names timm's save_for_hf writes
LOCAL_DIR = "local-dir:"


@dataclass
class TimmConfig:
    """A timm classifier. ``None`` fields keep timm's defaults for that model."""

    name: str = "resnet50"
    num_classes: int = 1000
    pretrained: bool = False  # timm's own weights (hub download or cache); False: random init
    checkpoint: str | None = None  # a state_dict file (.safetensors or torch) or an export_timm folder
    img_size: int | None = None  # only for models that accept it (ViTs, ...)
    drop_rate: float | None = None
    drop_path_rate: float | None = None
    in_chans: int | None = None


def build_timm(cfg: TimmConfig) -> NormalizedModel:
    """``timm.create_model`` (+ optional checkpoint) wrapped to take [0, 1] input.

    The mean/std are the model's pretrained_cfg's: timm's for the name, or an export folder's own.
    """
    if not timm.is_model(cfg.name):
        raise ValueError(f"unknown timm model {cfg.name!r}; pick a name from timm.list_models()")
    # timm drops None-valued kwargs, so models without img_size still build
    kwargs = dict(num_classes=cfg.num_classes, img_size=cfg.img_size, drop_rate=cfg.drop_rate,
                  drop_path_rate=cfg.drop_path_rate, in_chans=cfg.in_chans)  # fmt: skip
    if cfg.checkpoint and is_timm_export(cfg.checkpoint):
        folder = export_folder(cfg.checkpoint)
        _check_export_fits(cfg, folder)
        return normalized_timm(timm.create_model(LOCAL_DIR + str(folder), pretrained=True, **kwargs))
    model = timm.create_model(cfg.name, pretrained=cfg.pretrained, **kwargs)
    if cfg.checkpoint:
        load_weights(model, cfg.checkpoint)
    return normalized_timm(model)


def normalized_timm(model: nn.Module) -> NormalizedModel:
    """A timm model wrapped to take [0, 1] input, normalised with the mean/std of its pretrained_cfg."""
    data_cfg = timm.data.resolve_model_data_config(model)
    return NormalizedModel(model, mean=data_cfg["mean"], std=data_cfg["std"])


def _check_export_fits(cfg: TimmConfig, folder: Path) -> None:
    # timm would silently re-initialise a classifier of another size, or resample a ViT's position embedding
    config = json.loads((folder / CONFIG).read_text())
    built = {"name": config["architecture"], **config.get("model_args", {}), "num_classes": config["num_classes"]}
    if isinstance(built.get("img_size"), list):
        built["img_size"] = built["img_size"][0] if len(set(built["img_size"])) == 1 else tuple(built["img_size"])
    wanted = {"name": timm.models.split_model_name_tag(cfg.name)[0], "num_classes": cfg.num_classes,
              "img_size": cfg.img_size, "in_chans": cfg.in_chans}  # fmt: skip
    wrong = {k: (v, built.get(k)) for k, v in wanted.items() if v is not None and v != built.get(k)}
    if wrong:
        raise ValueError(f"checkpoint {str(folder)!r} holds another model: {wrong} (config vs export); "
                         "set the model config to the export's values")  # fmt: skip


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state_dict file into ``model``, strictly; a ValueError names missing/unexpected keys.

    timm's loader reads .safetensors with safetensors and anything else with
    ``torch.load(weights_only=True)`` (no arbitrary unpickling), unwraps {"state_dict": ...} / EMA
    layouts and strips DDP/compile prefixes.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist; pass a saved state_dict or an export_timm folder")
    try:
        state_dict = timm.models.load_state_dict(str(path), use_ema=False, weights_only=True)
    except RuntimeError as err:  # timm refuses pickled non-tensor objects (weights_only)
        raise ValueError(f"checkpoint {str(path)!r} holds more than tensors: {err}") from None
    load_strict(model, state_dict, source=f"checkpoint {str(path)!r}", hint="check the model name and num_classes")


def export_timm(
    model: NormalizedModel, cfg: TimmConfig, out_dir: str | Path, *, data_config: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model`` (built from ``cfg``) as a timm folder into ``out_dir`` and return the folder.

    The pretrained_cfg records ``model``'s mean/std, the input size ``cfg.img_size`` where set, and what
    ``data_config`` gives (timm's keys: ``input_size``, ``crop_pct``, ``interpolation``, ``crop_mode``;
    ``robust.eval.sets.timm_data_config`` gives those of an evaluation set); the rest stays timm's.
    """
    data = dict(data_config or {})
    if {"mean", "std"} & set(data):
        raise ValueError("data_config must not set mean/std: the export records the model's own (NormalizedModel)")
    architecture = model.model.pretrained_cfg["architecture"]
    if architecture != timm.models.split_model_name_tag(cfg.name)[0]:
        raise ValueError(f"the model is a {architecture}, the config names {cfg.name!r}; pass the model's own config")
    if cfg.img_size is not None and "input_size" not in data:
        data["img_size"] = cfg.img_size  # timm's pretrained_cfg still reports the default size
    data.update(mean=_float32_list(model.mean), std=_float32_list(model.std))
    out_dir = Path(out_dir)
    timm.models.save_for_hf(model.model, str(out_dir), safe_serialization=True, data_config=data)
    return out_dir


def _float32_list(t: torch.Tensor) -> list[float]:
    # str() of a numpy float32 is its shortest round-tripping form: 0.485, not 0.48500001430511475
    return [float(str(v)) for v in t.float().cpu().numpy()]


def export_folder(path: str | Path) -> Path:
    """The folder of an export named by ``path`` or ``local-dir:<path>`` (timm's own spelling)."""
    return Path(str(path).removeprefix(LOCAL_DIR)).expanduser()


def is_timm_export(path: str | Path) -> bool:
    """Whether ``path`` (or ``local-dir:<path>``) is a folder that :func:`export_timm` (or timm's save_for_hf) wrote."""
    folder = export_folder(path)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        return False
    config = json.loads((folder / CONFIG).read_text())
    return isinstance(config, dict) and {"architecture", "num_classes", "pretrained_cfg"} <= set(config)


def load_exported(path: str | Path) -> NormalizedModel:
    """Rebuild an :func:`export_timm` folder (``path`` or ``local-dir:<path>``) with timm: [0, 1] input,
    normalised with the mean/std of its pretrained_cfg."""
    if not is_timm_export(path):
        raise ValueError(f"{str(path)!r} is not a timm export; pass the folder export_timm wrote "
                         f"(it holds {CONFIG} and {WEIGHTS})")  # fmt: skip
    return normalized_timm(timm.create_model(LOCAL_DIR + str(export_folder(path)), pretrained=True))
