"""Distributed evaluation: the work items of any evaluation sets go through one actor pool on the teacher resource.

The driver builds the sets (a wrong layout fails here, before any actor starts) and splits them into
work items (``robust.eval.evaluate.set_parts``: runs of samples or of a shard file); the sets with
their file lists reach the actors once, as constructor arguments (Ray Data keeps them in the object
store), and the items stream through the pool as (set, item) indices. Every actor loads all the
models once; per work item it reads the samples, corrupts each batch once per (corruption, severity)
and scores every model on the same pixels. Actors return per-item tallies (sums and counts); the
driver adds them per model and set.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm import tqdm

from cluster.config import TEACHER_RESOURCE, TeacherPoolConfig
from robust.data.shards import ShardDataset
from robust.eval.corruptions import ALL, IMAGENET_C
from robust.eval.evaluate import Part, evaluate_part, set_parts
from robust.eval.metrics import Tally
from robust.eval.models import ModelSpec, ZeroShotConfig, load_model, param_fields, parse_model
from robust.eval.report import model_entry, set_entry, write_report
from robust.eval.sets import EvalSet, EvalSetConfig, build_eval_set

Plan = list[tuple[EvalSet, list[Part]]]


@dataclass
class PoolEvalConfig:
    """How the pool evaluates: batches, work-item size, corruption noise, loader processes per actor."""

    batch_size: int = 150  # images per forward pass (sequences for ImageNet-P)
    part_batches: int = 8  # batches per work item sent to an actor
    seed: int = 0  # corruption noise: a batch's pixels depend on the seed, its set, item and position only
    loader_workers: int = 0  # DataLoader processes per actor that decode images (GPU actors: cpus_per_actor - 1)


@dataclass
class EvalConfig(PoolEvalConfig):
    """The DAD run's evaluation: its test shards clean and under these corruptions."""

    corruptions: list[str] = field(default_factory=lambda: list(IMAGENET_C))
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])


@dataclass
class SetResult:
    """One model's totals on one set."""

    tally: Tally = field(default_factory=Tally)
    n: int = 0


class EvalWorker:
    """The Ray Data actor: builds the models once, then evaluates one work item per call."""

    def __init__(self, models: list[ModelSpec], plan: Plan, cfg: PoolEvalConfig, clip: ZeroShotConfig) -> None:
        self.cfg, self.plan = cfg, plan
        # The GPU Ray gave this actor (pools.gpus_per_actor), never one it merely sees.
        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        self.models = {m.name: load_model(m, clip=clip, device=self.device) for m in models}

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        k, j = int(rows["set"][0]), int(rows["part"][0])
        eval_set, parts = self.plan[k]
        cfg = self.cfg
        tallies, n = evaluate_part(self.models, eval_set, parts[j], part_id=j, batch_size=cfg.batch_size, seed=cfg.seed,
                                   num_workers=cfg.loader_workers, device=self.device)  # fmt: skip
        return {"set": np.array([k]), "tallies": np.array([tallies], dtype=object), "n": np.array([n])}


def evaluate_sets(models: Sequence[ModelSpec], eval_sets: Sequence[EvalSet], cfg: PoolEvalConfig, *,
                  pools: TeacherPoolConfig, clip: ZeroShotConfig) -> dict[str, dict[str, SetResult]]:
    """Every model on every set through the teacher-resource actor pool: {model: {set: SetResult}}."""
    plan: Plan = [(s, set_parts(s, part_size=cfg.batch_size * cfg.part_batches)) for s in eval_sets]
    items = [{"set": k, "part": j} for k, (_, parts) in enumerate(plan) for j in range(len(parts))]
    sizes = [p.size for _, parts in plan for p in parts]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        EvalWorker, fn_constructor_kwargs={"models": list(models), "plan": plan, "cfg": cfg, "clip": clip},
        batch_size=1, compute=ray.data.ActorPoolStrategy(min_size=pools.min_actors, max_size=pools.max_actors),
        num_cpus=pools.cpus_per_actor, num_gpus=pools.gpus_per_actor, resources={TEACHER_RESOURCE: 1})  # fmt: skip
    totals = {m.name: {s.name: SetResult() for s in eval_sets} for m in models}
    total = None if None in sizes else sum(sizes)
    with tqdm(total=total, desc=f"evaluate {len(models)} models on {len(eval_sets)} sets", unit="sample") as bar:
        for batch in ds.iter_batches(batch_size=1):
            name, n = eval_sets[int(batch["set"][0])].name, int(batch["n"][0])
            for model, tally in batch["tallies"][0].items():
                result = totals[model][name]
                result.tally, result.n = result.tally + tally, result.n + n
            bar.update(n)
    return totals


def build_report(totals: dict[str, dict[str, SetResult]], models: Sequence[ModelSpec], *, clean: str) -> dict:
    """The report dict: model entries (the DAD report's fields) and the per-set section."""
    report: dict = {"models": {}, "per_set": {}}
    for spec in models:
        per_set = totals[spec.name]
        report["models"][spec.name] = {**model_entry({s: r.tally for s, r in per_set.items()}, clean=clean),
                                       "weights": spec.weights, **param_fields(spec)}  # fmt: skip
        report["per_set"][spec.name] = {s: set_entry(r.tally, s, n=r.n) for s, r in per_set.items()}
    return report


def stored_size(shards: str) -> int:
    """The short side of the first image in a shard set (the DAD test shards are stored at the eval size)."""
    first = next(iter(ShardDataset(shards)), None)
    if first is None:
        raise ValueError(f"no decodable image in the test shards {shards}; check data.test_shards")
    return min(first["image"].shape[:2])


def evaluate_models(models: dict[str, Path], test_shards: str, cfg: EvalConfig, *, pools: TeacherPoolConfig,
                    out_dir: Path, costs_s: dict[str, float] | None = None) -> dict:
    """Evaluate exported models on ``test_shards`` clean and under the corruption suite; write the report."""
    if not test_shards:
        raise ValueError("nothing to evaluate on: pass data.test_shards=/path/to/test/shards")
    bad = sorted(set(cfg.corruptions) - set(ALL))
    if bad:
        raise ValueError(f"unknown corruptions {bad} in eval.corruptions; choose from {list(ALL)}")
    size = stored_size(test_shards)
    test = EvalSetConfig(kind="shards", root=test_shards, name="clean", image_size=size, crop_pct=1.0,
                         corruptions=list(cfg.corruptions), severities=list(cfg.severities))  # fmt: skip
    specs = [parse_model(f"{name}={path}", clip=ZeroShotConfig()) for name, path in models.items()]
    t0 = time.perf_counter()
    totals = evaluate_sets(specs, [build_eval_set(test)], cfg, pools=pools, clip=ZeroShotConfig())
    report = build_report(totals, specs, clean="clean")
    report["eval"] = {"test_shards": test_shards, "corruptions": cfg.corruptions, "severities": cfg.severities,
                      "seconds": time.perf_counter() - t0}  # fmt: skip
    for name, entry in report["models"].items():
        if costs_s and name in costs_s:
            entry["train_cost_s"] = costs_s[name]
    write_report(report, out_dir)
    return report
