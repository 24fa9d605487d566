"""One-call evaluation in one process (no Ray), like RobustBench's ``benchmark``: models on sets -> the report dict.

A model is a torch module that takes [0, 1] RGB images (a bare timm model, known by its
``pretrained_cfg``, is first wrapped to normalise with its own mean/std), or a spec string of
``robust.eval.models.parse_model``: an export folder, ``timm:<name>[.<tag>]`` or ``clip:<arch>/<tag>``.
The sets are ``EvalSetConfig`` s (clean shards or folders, their on-the-fly X-C, ImageNet-C/-R/-A/
-Sketch/-V2/-P, ObjectNet); exactly one, the in-distribution test set, has ``shifted=False``.
``report_from_tallies`` assembles the report dict here and in the Ray evaluation recipe alike; both
evaluate the same work items with ``robust.eval.evaluate.evaluate_part``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from robust.eval.evaluate import Model, SetResult, evaluate_in_process
from robust.eval.models import ModelSpec, ZeroShotConfig, check_fit, load_model, param_fields, parse_model
from robust.eval.report import model_entry, set_entry
from robust.eval.corruptions.weather import frost_texture_source
from robust.eval.sets import EvalSet, EvalSetConfig, build_eval_set, in_distribution
from robust.models.normalize import NormalizedModel
from robust.models.timm_models import normalized_timm

ModelLike = nn.Module | Callable[[torch.Tensor], torch.Tensor] | str


def benchmark(
    models: ModelLike | Mapping[str, ModelLike],
    sets: Sequence[EvalSetConfig],
    *,
    batch_size: int = 150,
    part_batches: int = 8,
    seed: int = 0,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    clip: ZeroShotConfig | None = None,
    progress: bool = True,
) -> dict:
    """Every model (one, or {report name: model}) on every set; the report dict of ``report_from_tallies``
    with an "eval" section. Modules are moved to ``device`` and put in eval mode; ``clip`` configures the
    zero-shot head of ``clip:`` specs; the other arguments are ``evaluate_in_process``'s."""
    eval_sets = build_sets(sets)
    named = dict(models) if isinstance(models, Mapping) else {"": models}
    loaded = [_load(name, model, clip=clip or ZeroShotConfig(), device=device) for name, model in named.items()]
    specs = [spec for spec, _ in loaded]
    check_unique("model", [s.name for s in specs], "pass {name: model}")
    check_fit(specs, eval_sets)
    t0 = time.perf_counter()
    totals = evaluate_in_process({spec.name: model for spec, model in loaded}, eval_sets, batch_size=batch_size,
                                 part_batches=part_batches, seed=seed, num_workers=num_workers, device=device,
                                 progress=progress)  # fmt: skip
    return report_from_tallies(totals, specs, eval_sets, seed=seed, seconds=time.perf_counter() - t0)


def build_sets(sets: Sequence[EvalSetConfig]) -> list[EvalSet]:
    """The evaluation sets, checked: names unique, exactly one in-distribution set."""
    eval_sets = [build_eval_set(cfg) for cfg in sets]
    check_unique("set", [s.name for s in eval_sets], "give each set a name")
    in_distribution(eval_sets)
    return eval_sets


def report_from_tallies(totals: Mapping[str, Mapping[str, SetResult]], specs: Sequence[ModelSpec],
                        eval_sets: Sequence[EvalSet], *, seed: int, seconds: float) -> dict:
    """The report dict from {model: {set: SetResult}}: per model its entry (``model_entry``, the DAD report's
    fields) with "weights" and RPT parameter counts, the "per_set" section (``set_entry``), and the "eval"
    section: each set's config, the corruption noise seed, the frost photographs used, the seconds taken."""
    clean = in_distribution(eval_sets).name
    report: dict = {"models": {}, "per_set": {}}
    for spec in specs:
        per_set = totals[spec.name]
        report["models"][spec.name] = {**model_entry({s: r.tally for s, r in per_set.items()}, clean=clean),
                                       "weights": spec.weights, **param_fields(spec)}  # fmt: skip
        report["per_set"][spec.name] = {s: set_entry(r.tally, s, n=r.n) for s, r in per_set.items()}
    report["eval"] = {"sets": {s.name: dataclasses.asdict(s.cfg) for s in eval_sets}, "seed": seed,
                      "frost": frost_texture_source(), "seconds": round(seconds, 1)}
    return report


def _load(name: str, model: ModelLike, *, clip: ZeroShotConfig, device: torch.device | str) -> tuple[ModelSpec, Model]:
    if isinstance(model, str):
        spec = parse_model(model, clip=clip)
        spec = dataclasses.replace(spec, name=name) if name else spec
        return spec, load_model(spec, clip=clip, device=device)
    if not callable(model):
        raise ValueError(f"model {name!r} is a {type(model).__name__}; pass a torch module, a callable on [0, 1] "
                         "images or a spec string (an export folder, timm:NAME.TAG, clip:ARCH/TAG)")  # fmt: skip
    if isinstance(model, nn.Module):
        if hasattr(model, "pretrained_cfg"):  # a bare timm model takes normalised input
            model = normalized_timm(model)
        model = model.to(device).eval()
    inner = model.model if isinstance(model, NormalizedModel) else model
    spec = ModelSpec(name or "model", "module", type(inner).__qualname__, getattr(inner, "num_classes", None))
    return spec, model


def check_unique(what: str, names: list[str], fix: str) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{what} names {repeated} repeat; {fix}")
