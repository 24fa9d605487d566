"""The steps every job takes, written once: the run and data config sections, the checks before any
work, the run directory with its resolved config, Ray and its resource check, training one model
through the student pool (skipped when a previous run finished it), and the per-seed loop.

A job (``cluster.jobs``) is a short composition of these with its own producer and stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import ray
import timm

from cluster.engine.deepspeed_config import OptimConfig, validate_optim
from cluster.engine.pools import STUDENT_RESOURCE, TEACHER_RESOURCE, PoolsConfig, check_pools
from cluster.engine.ray_cluster import RayConfig, check_resources, start_ray, training_needs
from cluster.engine.streams import bounded, execution_options, shard_manifest
from cluster.engine.tasks import StudentTask
from cluster.engine.tracking import LoggingConfig
from cluster.engine.trainer import DONE, TrainJob, fit
from robust.config import save_config
from robust.data.shards import Manifest
from robust.eval.study import write_study
from robust.models.timm_models import TimmConfig



@dataclass
class DataConfig:
    train_shards: str = ""  # shard dir with manifest.json (robust-distill data convert), on a path every node sees
    test_shards: str = ""  # evaluated clean and under the corruption suite
    max_in_flight_mb: float = 1024  # object-store MiB the stream may run ahead of the students
    preserve_order: bool = True  # the same stream and split on every run (reproducible); False: first come first served


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    storage_path: str = ""  # Ray Train checkpoints (a shared path or s3://...); default: <run dir>/ray
    epochs: int = 30
    checkpoint_every: int = 500
    log_every: int = 20
    max_failures: int = 3
    seed: int = 0  # everything random in a run: shard order, crops, DAD random starts, initialisation, dropout
    seeds: list[int] = field(default_factory=list)  # a multi-seed study: every model once per seed (overrides seed)
    log_keys: bool = False  # debug: each worker logs the (epoch, key) of every sample it trains on


def run_dir(run: RunConfig) -> Path:
    return Path(run.out_dir).expanduser().resolve() / run.name


def seeds(run: RunConfig) -> list[int]:
    return list(run.seeds) or [run.seed]


def seed_dir(run: RunConfig, seed: int) -> Path:
    """Where one seed's models go: the run dir itself, or ``seed-<s>/`` in a multi-seed study."""
    return run_dir(run) / f"seed-{seed}" if run.seeds else run_dir(run)


def check_run(run: RunConfig) -> None:
    if run.epochs < 1 or run.checkpoint_every < 1 or run.log_every < 1 or run.max_failures < 0:
        raise ValueError(f"run.epochs, run.checkpoint_every and run.log_every must be >= 1 and run.max_failures "
                         f">= 0; got {run.epochs}, {run.checkpoint_every}, {run.log_every}, {run.max_failures}")
    if len(set(run.seeds)) != len(run.seeds):
        raise ValueError(f"run.seeds {run.seeds} repeats a seed; list each once")
    if not run.name or "/" in run.name:
        raise ValueError(f"run.name {run.name!r} must be a non-empty folder name")


def check_methods(methods: Iterable[str], known: Iterable[str]) -> None:
    methods, known = list(methods), sorted(known)
    if not methods or set(methods) - set(known) or len(set(methods)) != len(methods):
        raise ValueError(f"run.methods {methods} must list distinct methods out of {known}")


def check_data(data: DataConfig, *, what: str = "the recipe") -> Manifest:
    """The training set's manifest; every user error about the data fails here, saying what to pass."""
    if not data.train_shards:
        raise ValueError(f"no training data for {what}: pass data.train_shards=/path/to/shards (make them with "
                         "`robust-distill data convert IMAGEFOLDER OUT`) or run with preset=local")
    if data.max_in_flight_mb <= 0:
        raise ValueError(f"data.max_in_flight_mb must be > 0, got {data.max_in_flight_mb}")
    manifest = shard_manifest(data.train_shards)
    if data.test_shards:
        shard_manifest(data.test_shards)
    return manifest


def check_model(cfg: TimmConfig, *, key: str) -> None:
    """A timm model config that can be built: a known name, and a checkpoint that exists when one is named."""
    if not timm.is_model(cfg.name):
        raise ValueError(f"{key}.name={cfg.name!r} is not a timm model; pick a name from timm.list_models()")
    check_path(cfg.checkpoint, key=f"{key}.checkpoint", what="a state_dict file or an exported model folder")


def check_path(path: str | None, *, key: str, what: str) -> None:
    if path and not Path(path).expanduser().exists():
        raise ValueError(f"{key}={path!r} does not exist; pass {what}, or leave it empty")


def check_classes(data_classes: int | None, **models: int) -> int:
    """The class count every model must share with the data; a ValueError names each side."""
    counts = {"data": data_classes, **models} if data_classes is not None else dict(models)
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise ValueError(f"class counts differ: {detail}; set the models' num_classes to the data's")
    return next(iter(counts.values()))


def steps_per_epoch(total: int, pools: PoolsConfig, optim: OptimConfig) -> int:
    validate_optim(optim)
    steps = total // (pools.student.num_workers * optim.micro_batch_size * optim.grad_accum)
    if steps < 1:
        raise ValueError(f"{total} training samples are fewer than one global batch ({pools.student.num_workers} "
                         f"workers x optim.micro_batch_size {optim.micro_batch_size} x optim.grad_accum "
                         f"{optim.grad_accum}); lower optim.micro_batch_size")
    return steps


def check_in_flight(data: DataConfig, *, batch_bytes: int) -> int:
    """The object-store bound in bytes; it must hold two of the stream's batches or nothing ever flows."""
    limit = int(data.max_in_flight_mb * 2**20)
    if limit < 2 * batch_bytes:
        raise ValueError(f"data.max_in_flight_mb={data.max_in_flight_mb:g} holds fewer than two batches of "
                         f"{batch_bytes / 2**20:.1f} MB; raise it or lower pools.teacher.batch_size")
    return limit


def begin(cfg, out: Path, ray_cfg: RayConfig, *, need: dict[str, float], local: dict[str, float]) -> None:
    """Before the work: the run directory with the resolved config, Ray (a local cluster gets the custom
    resources ``local``), and the check that the cluster holds what the run ``need``s at once."""
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    start_ray(ray_cfg, resources=local)
    # Progress comes from the workers' step lines and the evaluation bar, not Ray Data's operator bars nor its
    # two lines at each dataset's start (its id, log directory and plan); the context travels with the datasets.
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False
    if ray_cfg.check_resources:
        check_resources(need)


def begin_training(cfg, pools: PoolsConfig, ray_cfg: RayConfig, run: RunConfig, *, teacher_pool: bool) -> None:
    """``begin`` for a training job: its pools checked first, the run directory, the pools' resources."""
    check_pools(pools)
    begin(cfg, run_dir(run), ray_cfg, need=training_needs(pools, teacher_pool=teacher_pool),
          local={TEACHER_RESOURCE: pools.teacher.max_actors, STUDENT_RESOURCE: pools.student.num_workers})


@dataclass
class Trained:
    """A model's export and what its training cost."""

    path: Path
    startup_s: float  # the one-time start: worker group, DeepSpeed, pools, the first batch
    train_s: float  # the model's own training steps
    pass_s: float  # the whole pass it was trained in (with the other students of the pass, and waits for data)
    train_samples: int
    steps: int  # optimizer steps


def train(tasks: dict[str, StudentTask], stream: ray.data.Dataset, out: Path, *, name: str, run: RunConfig,
          seed: int, data: DataConfig, pools: PoolsConfig, optim: OptimConfig, total: int, batch_bytes: int,
          resume: ray.actor.ActorHandle, logging: LoggingConfig) -> dict[str, Trained]:
    """Train ``tasks`` in one pass over ``stream``, each into ``out/<task>`` (export, metrics.jsonl); a pass
    whose models are all finished (``done.json``) is not run again."""
    if not all((out / t / DONE).is_file() for t in tasks):
        limit = check_in_flight(data, batch_bytes=batch_bytes)
        job = TrainJob(tasks=tasks, optim=optim, epochs=run.epochs, steps_per_epoch=steps_per_epoch(total, pools, optim),
                       run_dir=str(out), seed=seed, checkpoint_every=run.checkpoint_every, log_every=run.log_every,
                       log_keys=run.log_keys, resume=resume, started_at=time.time(), logging=logging, group=name)
        # the Ray Train run is named by its students, so a rerun with other methods never resumes another pass
        fit(job, bounded(stream, limit), pools.student, name=f"{name}-{'+'.join(tasks)}",
            storage_path=run.storage_path or str(run_dir(run) / "ray"),
            execution=execution_options(limit, preserve_order=data.preserve_order), max_failures=run.max_failures)
    return {t: Trained(out / t, **json.loads((out / t / DONE).read_text())) for t in tasks}


def report_seeds(reports: dict[int, dict], out: Path) -> dict:
    """One seed: its report. Several: the paired study over seeds (study.json/.md and plots in ``out``)."""
    if len(reports) == 1:
        return next(iter(reports.values()))
    files = write_study(reports, out)
    return {"seeds": reports, "study": json.loads(files.json.read_text())}
