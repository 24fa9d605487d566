"""``preset=local`` of the evaluation job: the local DAD run's students and teacher on the digits test
shards, clean and under the 15 corruptions at 5 severities."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from cluster.jobs.evaluation import EvaluationConfig
from robust.config import Preset
from robust.data.digits import build_digits_shards
from robust.eval.sets import EvalSetConfig
from robust.models.timm_models import is_timm_export


@dataclass
class LocalRun:
    """Where the local DAD run (``recipes/dad_imagenet.py preset=local``) lives."""

    runs: str = "runs"  # the DAD run's run.out_dir (its cache/ holds the digits shards)
    run: str = "local"  # the DAD run's run.name


@dataclass
class EvaluationLocalConfig(EvaluationConfig):
    local: LocalRun = field(default_factory=LocalRun)


OVERLAY: dict = {
    "out_dir": "runs/local/eval",
    "eval": {"batch_size": 75, "part_batches": 1},  # 6 work items of the 450 test digits for the 2 actors
    "pools": {"min_actors": 1, "max_actors": 2, "gpus_per_actor": 0, "cpus_per_actor": 1},
    "ray": {"num_cpus": 2, "object_store_mb": 512},
}


def local_models(run_dir: Path) -> list[str]:
    """The students of a local DAD run (one export folder per method) and its teacher, as NAME=SPEC."""
    students = sorted(p for p in run_dir.iterdir() if is_timm_export(p)) if run_dir.is_dir() else []
    if not students:
        raise ValueError(f"no local DAD run in {run_dir}: make one with `python recipes/dad_imagenet.py "
                         "preset=local` (about 10 minutes on 2 CPU cores), or pass models=[...]")  # fmt: skip
    models = [f"{p.name}={p}" for p in students]
    config = run_dir / "config.yaml"
    if config.is_file():
        teacher = OmegaConf.load(config).teacher
        if teacher.kind == "timm" and teacher.timm.checkpoint and is_timm_export(teacher.timm.checkpoint):
            models.append(f"teacher={teacher.timm.checkpoint}")
    return models


def prepare(cfg: EvaluationLocalConfig) -> None:
    """Fill what the user left empty: the digits test set (+ its X-C), the local run's models and costs."""
    runs = Path(cfg.local.runs).expanduser().resolve()
    run_dir = runs / cfg.local.run
    if not cfg.sets:
        test = build_digits_shards(runs / "cache" / "digits")["test"]  # a no-op when the DAD run built them
        cfg.sets = [EvalSetConfig(kind="shards", root=str(test), name="clean", image_size=32, crop_pct=1.0,
                                  corruptions=["all"], shifted=False)]  # fmt: skip
    if not cfg.models:
        cfg.models = local_models(run_dir)
    if not cfg.costs and (run_dir / "report.json").is_file():
        cfg.costs = str(run_dir / "report.json")


LOCAL = Preset(OVERLAY, schema=EvaluationLocalConfig, prepare=prepare)
