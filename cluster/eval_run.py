"""The evaluation recipe from top to bottom: check models and sets, start Ray, evaluate through the pool, report.

Any list of models (exports, ``timm:`` or ``clip:`` specs, ``robust.eval.models``) on any list of sets
(``robust.eval.sets``; the first is the in-distribution test set). ``preset=local`` evaluates the
students and the teacher of a local DAD run on the digits test shards, clean and under the 15
corruptions at 5 severities.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from cluster.config import PoolsConfig, StudentPoolConfig, TeacherPoolConfig
from cluster.ray_init import RayInitConfig, begin_run
from cluster.evaluate import PoolEvalConfig, build_report, evaluate_sets
from robust.data.digits import build_digits_shards
from robust.eval.models import ModelSpec, ZeroShotConfig, check_fit, parse_model
from robust.eval.report import COST_FIELDS, ReportFiles, write_report
from robust.eval.sets import EvalSet, EvalSetConfig, build_eval_set

UNLABELLED_KINDS = ("imagenet-c", "imagenet-p")  # no clean accuracy: cannot be the in-distribution set


@dataclass
class LocalEvalConfig:
    """``preset=local``: where the local DAD run (``recipes/dad_imagenet.py preset=local``) lives."""

    runs: str = "runs"  # the DAD run's run.out_dir (its cache/ holds the digits shards)
    run: str = "local"  # the DAD run's run.name


@dataclass
class EvalRecipeConfig:
    models: list[str] = field(default_factory=list)  # [NAME=]SPEC: export dir/.json, timm:NAME[.TAG], clip:ARCH/TAG
    sets: list[EvalSetConfig] = field(default_factory=list)  # the first is the in-distribution test set
    costs: str = ""  # JSON {model: training seconds} or a report.json with train_cost_s / cost_ms_per_img
    out_dir: str = "runs/eval"
    eval: PoolEvalConfig = field(default_factory=PoolEvalConfig)
    clip: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    pools: TeacherPoolConfig = field(default_factory=TeacherPoolConfig)
    ray: RayInitConfig = field(default_factory=RayInitConfig)
    local: LocalEvalConfig = field(default_factory=LocalEvalConfig)


LOCAL_PRESET: dict = {
    "out_dir": "runs/local/eval",
    "eval": {"batch_size": 75, "part_batches": 1},  # 6 work items of the 450 test digits for the 2 actors
    "pools": {"min_actors": 1, "max_actors": 2, "gpus_per_actor": 0, "cpus_per_actor": 1},
    "ray": {"num_cpus": 2, "object_store_mb": 512},
}


def prepare_local(cfg: EvalRecipeConfig) -> None:
    """Fill what the user left empty: the digits test set (+ its X-C), the local run's models and costs."""
    runs = Path(cfg.local.runs).expanduser().resolve()
    run_dir = runs / cfg.local.run
    if not cfg.sets:
        test = build_digits_shards(runs / "cache" / "digits")["test"]  # a no-op when the DAD run built them
        cfg.sets = [EvalSetConfig(kind="shards", root=str(test), name="clean", image_size=32, crop_pct=1.0,
                                  corruptions=["all"])]  # fmt: skip
    if not cfg.models:
        cfg.models = local_models(run_dir)
    if not cfg.costs and (run_dir / "report.json").is_file():
        cfg.costs = str(run_dir / "report.json")


def local_models(run_dir: Path) -> list[str]:
    """The students of a local DAD run (one folder per method) and its teacher, as NAME=SPEC."""
    students = sorted(run_dir.glob("*/student.json"))
    if not students:
        raise ValueError(f"no local DAD run in {run_dir}: make one with `python recipes/dad_imagenet.py "
                         "preset=local` (about 10 minutes on 2 CPU cores), or pass models=[...]")  # fmt: skip
    models = [f"{p.parent.name}={p}" for p in students]
    config = run_dir / "config.yaml"
    if config.is_file():
        teacher = OmegaConf.load(config).teacher
        export = Path(teacher.timm.checkpoint or "").with_suffix(".json")
        if teacher.kind == "timm" and export.is_file():
            models.append(f"teacher={export}")
    return models


def load_costs(path: str) -> dict[str, dict[str, float]]:
    """{model: {cost field: value}} from a JSON {model: training seconds} or a report.json's entries."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"costs file {path!r} does not exist; pass a JSON {{model: seconds}} or a report.json")
    data = json.loads(file.read_text())
    if isinstance(data.get("models"), dict):
        return {m: {f: e[f] for f, _ in COST_FIELDS if f in e} for m, e in data["models"].items()}
    if not all(isinstance(v, (int, float)) for v in data.values()):
        raise ValueError(f"costs file {path!r} must map model names to training seconds, or be a report.json")
    return {m: {"train_cost_s": float(v)} for m, v in data.items()}


def check_config(cfg: EvalRecipeConfig) -> tuple[list[ModelSpec], list[EvalSet], dict[str, dict[str, float]]]:
    """Everything checked before Ray starts: models exist, sets have their layouts, classes match."""
    if not cfg.models:
        raise ValueError("no models: pass models=[DIR_OR_JSON,timm:NAME.TAG,clip:ARCH/TAG] (NAME=SPEC names one), "
                         "or preset=local for the local DAD run")  # fmt: skip
    if not cfg.sets:
        raise ValueError("no sets: pass 'sets=[{kind: imagefolder, root: /data/val, name: clean}]' or a "
                         "config=FILE.yaml (docs/evaluation.md); the first set is the in-distribution test set")
    if cfg.eval.batch_size < 1 or cfg.eval.part_batches < 1:
        raise ValueError(f"eval.batch_size and eval.part_batches must be >= 1, got {cfg.eval}")
    specs = [parse_model(spec, clip=cfg.clip) for spec in cfg.models]
    model_names = [m.name for m in specs]
    _unique("model", model_names, "name them NAME=SPEC")
    names = [s.name or s.kind for s in cfg.sets]
    _unique("set", names, "give each set a name")
    if "clean" in names[1:]:
        raise ValueError("only the first set (the in-distribution test set) may be named 'clean'")
    if cfg.sets[0].kind in UNLABELLED_KINDS:
        raise ValueError(f"the first set is the in-distribution test set and needs labels; {cfg.sets[0].kind} "
                         "has no clean accuracy: put the clean test set first")  # fmt: skip
    eval_sets = [build_eval_set(s) for s in cfg.sets]
    check_fit(specs, eval_sets)
    costs = load_costs(cfg.costs) if cfg.costs else {}
    if costs and not set(costs) & set(model_names):
        raise ValueError(f"costs file {cfg.costs!r} names {sorted(costs)}, none of the models {model_names}")
    return specs, eval_sets, costs


def _unique(what: str, names: list[str], fix: str) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{what} names {repeated} repeat; {fix}")


def run(cfg: EvalRecipeConfig) -> tuple[dict, ReportFiles]:
    """Evaluate every model on every set through the teacher-resource pool; write report.json/.md and plots."""
    specs, eval_sets, costs = check_config(cfg)
    out = Path(cfg.out_dir).expanduser().resolve()
    begin_run(cfg, out, PoolsConfig(teacher=cfg.pools, student=StudentPoolConfig(num_workers=0, gpus_per_worker=0)))
    t0 = time.perf_counter()
    totals = evaluate_sets(specs, eval_sets, cfg.eval, pools=cfg.pools, clip=cfg.clip)
    report = build_report(totals, specs, clean=eval_sets[0].name)
    report["eval"] = {"sets": {s.name: f"{s.cfg.kind} {s.cfg.root}" for s in eval_sets}, "seed": cfg.eval.seed,
                      "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    for name, entry in report["models"].items():
        entry.update(costs.get(name, {}))
    return report, write_report(report, out)
