"""Export and reload a tuned RPT student (or any ``robust.rpt.baselines`` method's ``PartialModel``).

Layout (``stem`` defaults to "model"): ``<stem>.safetensors`` holds the ``PartialModel``'s state_dict
(frozen backbone, tuned part, every head); ``<stem>.json`` holds what rebuilds the module around it:
``kind`` "rpt", the method (a ``METHODS`` name; a WiSE-FT model is a ``full_finetune`` one), the
``PartialConfig``, the ``SelectConfig`` of eq. 6, ``num_classes``, ``input_size`` and the tuned/total
parameter counts (paper Table 10). ``load_rpt`` builds the method's architecture from the config with
random weights (pretrained tags and checkpoint files named in it are never read: the split depends on
the architecture only) and loads the tensors with safetensors, so nothing is unpickled.

``RptClassifier`` is the module an evaluator scores: a three-head student predicts with eq. 6 (K
MC-dropout passes, head selection) and keeps the batch's ``Selection`` in ``last_selection``, from which
``robust.eval.evaluate.evaluate_batch`` counts F_correct; a one-head method returns its head's logits.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from robust.config import load_config
from robust.models.weights import load_strict
from robust.rpt.baselines import METHODS, build_method
from robust.rpt.partial import HEADS, PartialConfig, PartialModel
from robust.rpt.select import Selection, SelectConfig, check_select_config, predict

KIND = "rpt"


def export_rpt(
    student: PartialModel,
    out_dir: str | Path,
    *,
    stem: str = "model",
    method: str,
    cfg: PartialConfig,
    select: SelectConfig | None = None,
) -> Path:
    """Write ``<stem>.safetensors`` (``student.state_dict()``) and ``<stem>.json``; return the weights path.

    ``cfg`` is the config ``student`` was built from with ``build_method(method, cfg)``.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown; use one of {sorted(METHODS)} (WiSE-FT: full_finetune)")
    select = select or SelectConfig()
    check_select_config(select)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{stem}.safetensors"
    safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()},
                                str(weights))  # fmt: skip
    meta: dict[str, Any] = {
        "kind": KIND,
        "method": method,
        "partial": dataclasses.asdict(cfg),
        "select": dataclasses.asdict(select),
        "num_classes": student.num_classes,
        "input_size": list(student.info["input_size"]),
        "heads": list(student.head_names),
        "param_counts": student.param_counts(),
        "split": {k: v for k, v in student.info.items() if k != "input_size"},  # for reports
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return weights


def is_rpt_export(json_path: str | Path) -> bool:
    """Whether ``json_path`` (or the .json beside a .safetensors path) was written by :func:`export_rpt`."""
    path = Path(json_path).with_suffix(".json")
    if not path.is_file():
        return False
    meta = json.loads(path.read_text())
    return isinstance(meta, dict) and meta.get("kind") == KIND


class RptClassifier(nn.Module):
    """[0, 1] images -> logits_BK of a loaded RPT method.

    Three heads: eq. 6 (the backbone once, ``select.passes`` MC-dropout passes through the tuned part,
    the clean or the unclean head per sample); the output is the log of the chosen head's MC-mean
    probabilities and ``last_selection`` holds the batch's routing. One head: that head's logits.
    """

    def __init__(self, student: PartialModel, select: SelectConfig) -> None:
        super().__init__()
        heads = student.head_names
        if set(heads) != set(HEADS) and len(heads) != 1:
            raise ValueError(f"heads {list(heads)}: a classifier needs all of {list(HEADS)} (eq. 6) or a single head")
        self.routes = len(heads) > 1
        if self.routes:
            check_select_config(select)
        self.student, self.select = student, select
        self.last_selection: Selection | None = None

    def forward(self, x01_BCHW: Tensor) -> Tensor:
        if not self.routes:
            (logits_BK,) = self.student(x01_BCHW).values()
            return logits_BK
        self.last_selection = predict(self.student, x01_BCHW, cfg=self.select)
        return self.last_selection.logits_BK


def _paths(path: str | Path, stem: str) -> tuple[Path, Path]:
    path = Path(path)
    base = path / stem if path.is_dir() else path.with_suffix("")
    meta_path, weights = base.with_suffix(".json"), base.with_suffix(".safetensors")
    if not meta_path.is_file() or not weights.is_file():
        raise ValueError(f"expected {meta_path} and {weights}; pass the folder (and stem) export_rpt wrote")
    return meta_path, weights


def load_rpt(path: str | Path, *, stem: str = "model") -> RptClassifier:
    """Rebuild an :func:`export_rpt` model from its folder (+ ``stem``) or its .json/.safetensors path, in eval mode."""
    meta_path, weights = _paths(path, stem)
    if not is_rpt_export(meta_path):
        raise ValueError(f"{meta_path} is not an RPT export (kind != {KIND!r}); load it with its own loader")
    meta = json.loads(meta_path.read_text())
    cfg = load_config(PartialConfig, presets=[meta["partial"]])
    # random init of the same architecture: no download, no checkpoint read; the weights come next
    cfg = dataclasses.replace(cfg, timm=dataclasses.replace(cfg.timm, pretrained=False, checkpoint=None),
                              clip=dataclasses.replace(cfg.clip, pretrained=""))  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
        # a fixed seed gives open_clip's random text tower the same weights on every load, so its
        # class-embedding cache entry (only used to build the head before it is overwritten) is reused
        torch.manual_seed(0)
        student = build_method(meta["method"], cfg)
    load_strict(student, safetensors.torch.load_file(str(weights)), source=f"weights {str(weights)!r}",
                hint=f"they must come from the same export as {meta_path.name}")  # fmt: skip
    if student.param_counts() != meta["param_counts"]:
        raise ValueError(f"{meta_path.name} records {meta['param_counts']} parameters but the rebuilt "
                         f"{meta['method']} student has {student.param_counts()}; re-export the model")  # fmt: skip
    return RptClassifier(student, load_config(SelectConfig, presets=[meta["select"]])).eval()
