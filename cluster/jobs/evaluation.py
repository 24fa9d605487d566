"""The evaluation job: any models on any sets through the actor pool, one report.

Any list of models (exports, ``timm:`` or ``clip:`` specs, ``robust.eval.models``) on any list of sets
(``robust.eval.sets``; exactly one, the in-distribution test set, is marked ``shifted: false``). The
per-item work and the report are the one-process API's (``robust.eval.benchmark``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cluster.engine.evaluate import PoolEvalConfig, evaluate_report
from cluster.engine.pools import TEACHER_RESOURCE, ActorPoolConfig, check_actor_pool
from cluster.engine.ray_cluster import RayConfig, actor_pool_needs
from cluster.engine.runner import begin
from robust.eval.benchmark import build_sets, check_unique
from robust.eval.models import ModelSpec, ZeroShotConfig, check_fit, parse_model
from robust.eval.report import COST_INPUTS, ReportFiles, write_report
from robust.eval.sets import EvalSet, EvalSetConfig


@dataclass
class EvaluationConfig:
    models: list[str] = field(default_factory=list)  # [NAME=]SPEC: export folder, timm:NAME[.TAG], clip:ARCH/TAG
    sets: list[EvalSetConfig] = field(default_factory=list)  # one of them shifted: false (the in-distribution set)
    costs: str = ""  # a report.json whose entries carry startup_s / train_s / train_samples
    out_dir: str = "runs/eval"
    eval: PoolEvalConfig = field(default_factory=PoolEvalConfig)
    clip: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    pools: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def load_costs(path: str) -> dict[str, dict[str, float]]:
    """{model: {cost field: value}} from a report.json's entries (a training job's report)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"costs file {path!r} does not exist; pass the report.json of a training run")
    models = json.loads(file.read_text()).get("models")
    if not isinstance(models, dict):
        raise ValueError(f"costs file {path!r} is not a report.json (no 'models' section)")
    return {m: {f: e[f] for f in COST_INPUTS if f in e} for m, e in models.items()}


def check(cfg: EvaluationConfig) -> tuple[list[ModelSpec], list[EvalSet], dict[str, dict[str, float]]]:
    """Everything checked before Ray starts: models exist, sets have their layouts, classes match."""
    if not cfg.models:
        raise ValueError("no models: pass models=[FOLDER,timm:NAME.TAG,clip:ARCH/TAG] (NAME=SPEC names one), "
                         "or preset=local for the local DAD run")  # fmt: skip
    if not cfg.sets:
        raise ValueError("no sets: pass 'sets=[{kind: imagefolder, root: /data/val, name: clean, shifted: false}]' "
                         "or a config=FILE.yaml (docs/evaluation.md)")
    if cfg.eval.batch_size < 1 or cfg.eval.part_batches < 1:
        raise ValueError(f"eval.batch_size and eval.part_batches must be >= 1, got {cfg.eval}")
    check_actor_pool(cfg.pools, key="pools")
    specs = [parse_model(spec, clip=cfg.clip) for spec in cfg.models]
    names = [m.name for m in specs]
    check_unique("model", names, "name them NAME=SPEC")
    eval_sets = build_sets(cfg.sets)
    check_fit(specs, eval_sets)
    costs = load_costs(cfg.costs) if cfg.costs else {}
    if costs and not set(costs) & set(names):
        raise ValueError(f"costs file {cfg.costs!r} names {sorted(costs)}, none of the models {names}")
    return specs, eval_sets, costs


def run(cfg: EvaluationConfig) -> tuple[dict, ReportFiles]:
    """Evaluate every model on every set through the teacher-resource pool; write report.json/.md and plots."""
    specs, eval_sets, costs = check(cfg)
    out = Path(cfg.out_dir).expanduser().resolve()
    begin(cfg, out, cfg.ray, need=actor_pool_needs(cfg.pools), local={TEACHER_RESOURCE: cfg.pools.max_actors})
    report = evaluate_report(specs, eval_sets, cfg.eval, pools=cfg.pools, clip=cfg.clip)
    for name, entry in report["models"].items():
        entry.update(costs.get(name, {}))
    return report, write_report(report, out)
