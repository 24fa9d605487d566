"""A DAD run from top to bottom: check the config, start Ray, train the students, evaluate, report.

Each method in ``run.methods`` trains one student of the same architecture through the same pools:
``ce`` (crops only), ``kd`` (+ teacher logits), ``dad`` (+ DAD samples; ``dad.mode`` online/offline).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray

from cluster.config import PoolsConfig
from cluster.ray_init import DataConfig, RayInitConfig, begin_run
from cluster.deepspeed_config import OptimConfig, validate_optim
from cluster.evaluate import EvalConfig, evaluate_models
from cluster.local import LocalConfig
from cluster.pipeline import (
    ResumePoint, batch_bytes, count_samples, execution_options, offline_stream, read_raw, shard_manifest, write_offline,
)  # fmt: skip
from cluster.student_pool import StudentJob, fit_students
from cluster.student_tasks import DistillTask
from cluster.teacher_pool import AugmentConfig, TeacherConfig, TeacherJob, teacher_stream
from robust.attacks.dad import DADConfig
from robust.losses.objectives import ObjectiveConfig
from robust.models.timm_models import TimmConfig
from robust.models.vqgan import VQGANConfig

METHODS = {"ce": ("ce", "ce"), "kd": ("kd", "kd"), "dad": ("dad", None)}  # method -> (pool mode, objective)


@dataclass
class DadSection(DADConfig):
    mode: str = "online"  # online: fresh DAD samples every epoch; offline: generate once, train from shards


@dataclass
class RunSection:
    name: str = "dad-imagenet"
    out_dir: str = "runs"
    storage_path: str = ""  # Ray Train checkpoints (a shared path or s3://...); default: <run dir>/ray
    methods: list[str] = field(default_factory=lambda: ["dad"])
    epochs: int = 30
    checkpoint_every: int = 500
    log_every: int = 20
    max_failures: int = 3
    seed: int = 0


@dataclass
class DadRecipeConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    dad: DadSection = field(default_factory=DadSection)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    student: TimmConfig = field(default_factory=lambda: TimmConfig(name="vit_base_patch16_224", num_classes=1000))
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pools: PoolsConfig = field(default_factory=PoolsConfig)
    run: RunSection = field(default_factory=RunSection)
    ray: RayInitConfig = field(default_factory=RayInitConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    local: LocalConfig = field(default_factory=LocalConfig)  # preset=local's cached stages


def run_dir(cfg: DadRecipeConfig) -> Path:
    return Path(cfg.run.out_dir).expanduser().resolve() / cfg.run.name


def check_config(cfg: DadRecipeConfig) -> int:
    """Everything that can be checked before Ray starts; returns the number of classes."""
    if not cfg.data.train_shards:
        raise ValueError("no training data: pass data.train_shards=/path/to/shards (make them with "
                         "`robust-distill data convert IMAGEFOLDER OUT`) or run with preset=local")
    unknown = sorted(set(cfg.run.methods) - set(METHODS))
    if unknown or not cfg.run.methods:
        raise ValueError(f"run.methods {cfg.run.methods} must be a non-empty subset of {sorted(METHODS)}")
    if cfg.dad.mode not in ("online", "offline"):
        raise ValueError(f"dad.mode must be 'online' or 'offline', got {cfg.dad.mode!r}")
    validate_optim(cfg.optim)
    manifest = shard_manifest(cfg.data.train_shards)  # also fails early on a missing path
    num_classes = manifest.num_classes or cfg.student.num_classes
    teacher_classes = (len(cfg.teacher.clip.class_names) or 1000) if cfg.teacher.kind == "clip" else cfg.teacher.timm.num_classes
    if cfg.student.num_classes != num_classes or teacher_classes != num_classes:
        raise ValueError(f"class counts differ: data {num_classes}, teacher {teacher_classes}, student "
                         f"{cfg.student.num_classes}; set student.num_classes / the teacher's classes to match")
    if cfg.data.test_shards:
        shard_manifest(cfg.data.test_shards)
    return num_classes


def _stream(cfg: DadRecipeConfig, mode: str, out: Path, num_classes: int, resume: ray.actor.ActorHandle) -> ray.data.Dataset:
    job = TeacherJob(mode=mode, teacher=cfg.teacher, vqgan=cfg.vqgan, dad=cfg.dad, augment=cfg.augment,
                     seed=cfg.run.seed)
    if mode != "dad" or cfg.dad.mode == "online":
        raw = read_raw(cfg.data.train_shards, epochs=cfg.run.epochs, seed=cfg.run.seed, resume=resume)
        return teacher_stream(raw, job, cfg.pools.teacher)
    shard_dir = out / "dad_shards"
    if not (shard_dir / "manifest.json").is_file():  # generated once, reused by later epochs and runs
        t0 = time.perf_counter()
        once = teacher_stream(read_raw(cfg.data.train_shards, seed=cfg.run.seed), job, cfg.pools.teacher)
        n = write_offline(once, shard_dir, total=count_samples(cfg.data.train_shards), num_classes=num_classes)
        (out / "offline_generation.json").write_text(json.dumps({"samples": n, "seconds": time.perf_counter() - t0}))
    return offline_stream(shard_dir, batch_size=cfg.pools.teacher.batch_size, epochs=cfg.run.epochs,
                          seed=cfg.run.seed, resume=resume)


def train_method(cfg: DadRecipeConfig, method: str, num_classes: int) -> Path:
    """Train one student with ``method``; returns the directory of its exported weights."""
    out = run_dir(cfg)
    mode, kind = METHODS[method]
    kind = kind or ("dad_online" if cfg.dad.mode == "online" else "dad_offline")
    resume = ResumePoint.remote()
    stream = _stream(cfg, mode, out, num_classes, resume)
    world = cfg.pools.student.num_workers
    steps = count_samples(cfg.data.train_shards) // (world * cfg.optim.micro_batch_size * cfg.optim.grad_accum)
    if steps < 1:
        raise ValueError("fewer training samples than one global batch: lower optim.micro_batch_size")
    job = StudentJob(task=DistillTask(cfg.student, dataclasses.replace(cfg.objective, kind=kind)), optim=cfg.optim,
                     epochs=cfg.run.epochs, steps_per_epoch=steps, run_dir=str(out / method),
                     checkpoint_every=cfg.run.checkpoint_every, log_every=cfg.run.log_every, resume=resume)
    limit = cfg.data.max_in_flight_mb * 2**20
    if limit < 2 * batch_bytes(cfg.pools.teacher.batch_size, cfg.augment.crop_size, num_classes, with_dad=True):
        raise ValueError("data.max_in_flight_mb holds fewer than two teacher batches; raise it or lower "
                         "pools.teacher.batch_size")
    storage = cfg.run.storage_path or str(out / "ray")
    fit_students(job, stream, cfg.pools.student, name=f"{cfg.run.name}-{method}", storage_path=storage,
                 max_failures=cfg.run.max_failures, execution=execution_options(limit))
    return out / method


def run(cfg: DadRecipeConfig, *, extra_models: dict[str, Path] | None = None) -> dict:
    """Train every method's student, evaluate them (and ``extra_models``), write the report."""
    num_classes = check_config(cfg)
    out = run_dir(cfg)
    begin_run(cfg, out, cfg.pools)
    models, costs = {}, {}
    for method in cfg.run.methods:
        t0 = time.perf_counter()
        models[method] = train_method(cfg, method, num_classes)
        costs[method] = time.perf_counter() - t0
    models.update(extra_models or {})
    return evaluate_models(models, cfg.data.test_shards, cfg.eval, pools=cfg.pools.teacher, out_dir=out, costs_s=costs)
