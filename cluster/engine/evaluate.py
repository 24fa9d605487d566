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

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from tqdm import tqdm

from cluster.engine.pools import ActorPoolConfig
from cluster.engine.runner import Trained
from cluster.engine.tracking import LoggingConfig, Tracker
from cluster.engine.teacher_pool import actor_device, pool_map
from robust.data.shard_reader import ShardDataset
from robust.eval.corruptions import ALL, IMAGENET_C
from robust.eval.benchmark import report_from_tallies
from robust.eval.evaluate import Part, SetResult, evaluate_part, set_parts
from robust.eval.metrics import tally_from_columns, tally_to_columns
from robust.eval.models import ModelSpec, ZeroShotConfig, load_model, parse_model
from robust.eval.report import write_report
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


class EvalWorker:
    """The Ray Data actor: builds the models once, then evaluates one work item per call."""

    def __init__(self, models: list[ModelSpec], plan: Plan, cfg: PoolEvalConfig, clip: ZeroShotConfig) -> None:
        self.cfg, self.plan = cfg, plan
        self.device = actor_device()
        self.models = {m.name: load_model(m, clip=clip, device=self.device) for m in models}

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        k, j = int(rows["set"][0]), int(rows["part"][0])
        eval_set, parts = self.plan[k]
        cfg = self.cfg
        tallies, n = evaluate_part(self.models, eval_set, parts[j], part_id=j, batch_size=cfg.batch_size, seed=cfg.seed,
                                   num_workers=cfg.loader_workers, device=self.device)  # fmt: skip
        # numeric columns, one row per element of every model's sums: Arrow carries them as they are
        columns = [(name, tally_to_columns(t)) for name, t in tallies.items()]
        out = {c: np.concatenate([cols[c] for _, cols in columns]) for c in columns[0][1]}
        rows = len(out["value"])
        return out | {"model": np.concatenate([[name] * len(cols["value"]) for name, cols in columns]),
                      "set": np.full(rows, k), "part": np.full(rows, j), "n": np.full(rows, n)}


def evaluate_sets(models: Sequence[ModelSpec], eval_sets: Sequence[EvalSet], cfg: PoolEvalConfig, *,
                  pools: ActorPoolConfig, clip: ZeroShotConfig) -> dict[str, dict[str, SetResult]]:
    """Every model on every set through the teacher-resource actor pool: {model: {set: SetResult}}."""
    plan: Plan = [(s, set_parts(s, part_size=cfg.batch_size * cfg.part_batches)) for s in eval_sets]
    items = [{"set": k, "part": j} for k, (_, parts) in enumerate(plan) for j in range(len(parts))]
    sizes = [p.size for _, parts in plan for p in parts]
    ds = pool_map(ray.data.from_items(items, override_num_blocks=len(items)), EvalWorker, pools, batch_size=1,
                  models=list(models), plan=plan, cfg=cfg, clip=clip)
    totals = {m.name: {s.name: SetResult() for s in eval_sets} for m in models}
    total = None if None in sizes else sum(sizes)
    with tqdm(total=total, desc=f"evaluate {len(models)} models on {len(eval_sets)} sets", unit="sample") as bar:
        for block in ds.iter_batches(batch_size=None):  # a block holds whole work items
            for k, j in {(int(k), int(j)) for k, j in zip(block["set"], block["part"])}:
                item = (block["set"] == k) & (block["part"] == j)
                for model in set(block["model"][item]):
                    rows = item & (block["model"] == model)
                    result = totals[str(model)][eval_sets[k].name]
                    result.tally = result.tally + tally_from_columns({c: v[rows] for c, v in block.items()})
                    result.n += int(block["n"][rows][0])
                bar.update(int(block["n"][item][0]))
    return totals


def stored_size(shards: str) -> int:
    """The short side of the first image in a shard set (the DAD test shards are stored at the eval size)."""
    first = next(iter(ShardDataset(shards)), None)
    if first is None:
        raise ValueError(f"no decodable image in the test shards {shards}; check data.test_shards")
    return min(first["image"].shape[:2])


def check_eval(cfg: EvalConfig, test_shards: str) -> None:
    """Before any work: a job's evaluation has test shards and known corruptions."""
    if not test_shards:
        raise ValueError("nothing to evaluate on: pass data.test_shards=/path/to/test/shards")
    bad = sorted(set(cfg.corruptions) - set(ALL))
    if bad:
        raise ValueError(f"unknown corruptions {bad} in eval.corruptions; choose from {list(ALL)}")
    if not cfg.severities or set(cfg.severities) - {1, 2, 3, 4, 5}:
        raise ValueError(f"eval.severities {cfg.severities} must be a non-empty subset of 1..5")
    if cfg.batch_size < 1 or cfg.part_batches < 1:
        raise ValueError(f"eval.batch_size and eval.part_batches must be >= 1, got {cfg.batch_size}, {cfg.part_batches}")


def evaluate_report(specs: Sequence[ModelSpec], eval_sets: Sequence[EvalSet], cfg: PoolEvalConfig, *,
                    pools: ActorPoolConfig, clip: ZeroShotConfig) -> dict:
    """The report dict (``robust.eval.benchmark.report_from_tallies``, as the one-process API) of every
    model on every set, evaluated through the actor pool."""
    t0 = time.perf_counter()
    totals = evaluate_sets(specs, eval_sets, cfg, pools=pools, clip=clip)
    return report_from_tallies(totals, specs, eval_sets, seed=cfg.seed, seconds=time.perf_counter() - t0)


def held_out_set(test_shards: str, cfg: EvalConfig) -> EvalSetConfig:
    """A training job's test set: its shards at their stored size, uncropped, with the corruption suite.
    Its preprocessing is what the job's exports record (``timm_data_config``), so timm reproduces it."""
    return EvalSetConfig(kind="shards", root=test_shards, name="clean", image_size=stored_size(test_shards),
                         crop_pct=1.0, corruptions=list(cfg.corruptions), severities=list(cfg.severities),
                         shifted=False)  # fmt: skip


def evaluate_models(trained: Mapping[str, Trained], test_shards: str, cfg: EvalConfig, *, pools: ActorPoolConfig,
                    out_dir: Path, logging: LoggingConfig, extra: Mapping[str, Path] | None = None) -> dict:
    """A training job's evaluation: the trained models (and ``extra`` exports) on ``test_shards`` clean and
    under the corruption suite; writes the report with each trained model's cost."""
    test = held_out_set(test_shards, cfg)
    models = {name: t.path for name, t in trained.items()} | dict(extra or {})
    specs = [parse_model(f"{name}={path}", clip=ZeroShotConfig()) for name, path in models.items()]
    report = evaluate_report(specs, [build_eval_set(test)], cfg, pools=pools, clip=ZeroShotConfig())
    for name, t in trained.items():
        report["models"][name] |= {"startup_s": t.startup_s, "train_s": t.train_s, "pass_s": t.pass_s,
                                   "train_samples": t.train_samples}
    files = write_report(report, out_dir)
    for name, t in trained.items():  # each model's evaluation beside its training curves
        tracker = Tracker(logging, t.path, name=f"{out_dir.name}/{name}", group=out_dir.name)
        tracker.log(json.loads(files.json.read_text())["models"][name], step=t.steps, prefix="eval")
        tracker.close()
    return report
