"""An RPT run from top to bottom (seed 002): check the config, start Ray, tune the large model with each
method through the pools, interpolate WiSE-FT, evaluate, report.

The teacher pool serves the frozen initial model and the small robust teacher (``cluster.rpt_pool``);
the student pool trains only the tuned part and the heads (``cluster.student_tasks.RptTask``). With
``run.feature_cache`` the pool computes the frozen backbone's features once, writes them as shards, and
the partially tuned methods train from them for every epoch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from safetensors.torch import load_file

from cluster.config import PoolsConfig
from cluster.ray_init import DataConfig, RayInitConfig, begin_run
from cluster.deepspeed_config import OptimConfig, validate_optim
from cluster.evaluate import EvalConfig, evaluate_models
from cluster.pipeline import ResumePoint, count_samples, execution_options, read_raw, shard_manifest
from cluster.rpt_local import RptLocalConfig
from cluster.rpt_pool import RptTeacherJob, decode_feature_cache, rpt_stream, write_feature_cache
from cluster.student_pool import StudentJob, fit_students
from cluster.student_tasks import RptTask
from cluster.teacher_pool import AugmentConfig
from robust.augment import AugMixConfig
from robust.models.timm_models import TimmConfig
from robust.rpt.baselines import METHODS, build_method, wise_ft
from robust.rpt.export import export_rpt
from robust.rpt.losses import RptLossConfig
from robust.rpt.partial import PartialConfig
from robust.rpt.select import SelectConfig, check_select_config

WISE_FT = "wise_ft"  # not trained: interpolates the initial model and full_finetune's result


@dataclass
class RptRunSection:
    name: str = "rpt"
    out_dir: str = "runs"
    storage_path: str = ""  # Ray Train checkpoints; default: <run dir>/ray
    methods: list[str] = field(default_factory=lambda: ["rpt", "apt", "full_finetune", WISE_FT])
    wise_alphas: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    feature_cache: bool = True  # partially tuned methods train from cached backbone features
    epochs: int = 10
    checkpoint_every: int = 500
    log_every: int = 20
    max_failures: int = 3
    seed: int = 0


@dataclass
class RptRecipeConfig:
    data: DataConfig = field(default_factory=DataConfig)
    # the large pretrained model (checkpoint or pretrained tag) and which part of it is tuned
    large: PartialConfig = field(default_factory=lambda: PartialConfig(
        timm=TimmConfig(name="vit_base_patch16_224", num_classes=1000, pretrained=True)))
    robust_teacher: TimmConfig = field(default_factory=lambda: TimmConfig(name="resnet50", num_classes=1000))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    augmix: AugMixConfig = field(default_factory=AugMixConfig)  # the augmented ("unclean") view
    loss: RptLossConfig = field(default_factory=RptLossConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pools: PoolsConfig = field(default_factory=PoolsConfig)
    run: RptRunSection = field(default_factory=RptRunSection)
    ray: RayInitConfig = field(default_factory=RayInitConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    local: RptLocalConfig = field(default_factory=RptLocalConfig)  # preset=local's cached stages


def run_dir(cfg: RptRecipeConfig) -> Path:
    return Path(cfg.run.out_dir).expanduser().resolve() / cfg.run.name


def check_config(cfg: RptRecipeConfig) -> dict:
    """Everything that can fail before Ray starts; returns the student's parameter counts."""
    if not cfg.data.train_shards:
        raise ValueError("no training data: pass data.train_shards=/path/to/shards or run with preset=local")
    unknown = sorted(set(cfg.run.methods) - set(METHODS) - {WISE_FT})
    if unknown or not cfg.run.methods:
        raise ValueError(f"run.methods {cfg.run.methods} must be a non-empty subset of {sorted([*METHODS, WISE_FT])}")
    if WISE_FT in cfg.run.methods and "full_finetune" not in cfg.run.methods:
        raise ValueError("wise_ft interpolates full_finetune's result: add full_finetune to run.methods")
    if any(not 0 <= a <= 1 for a in cfg.run.wise_alphas):
        raise ValueError(f"run.wise_alphas {cfg.run.wise_alphas} must lie in [0, 1]")
    check_select_config(cfg.select)
    validate_optim(cfg.optim)
    student = build_method("rpt", cfg.large)  # a bad tune_fraction / tune_from_block fails here
    classes = shard_manifest(cfg.data.train_shards).num_classes or student.num_classes
    if not student.num_classes == cfg.robust_teacher.num_classes == classes:
        raise ValueError(f"class counts differ: data {classes}, large model {student.num_classes}, robust teacher "
                         f"{cfg.robust_teacher.num_classes}; set large.timm.num_classes / robust_teacher.num_classes")
    if cfg.data.test_shards:
        shard_manifest(cfg.data.test_shards)
    return student.param_counts()


def _teacher_job(cfg: RptRecipeConfig, method: str, *, features: bool) -> RptTeacherJob:
    return RptTeacherJob(initial=cfg.large.timm, robust=cfg.robust_teacher, augment=cfg.augment, augmix=cfg.augmix,
                         features=cfg.large if features else None, method=method)


def _uses_cache(cfg: RptRecipeConfig, method: str) -> bool:
    return cfg.run.feature_cache and METHODS[method].student == "partial"


def _stream(cfg: RptRecipeConfig, method: str, resume: ray.actor.ActorHandle) -> ray.data.Dataset:
    pool = cfg.pools.teacher
    if not _uses_cache(cfg, method):
        raw = read_raw(cfg.data.train_shards, epochs=cfg.run.epochs, seed=cfg.run.seed, resume=resume)
        return rpt_stream(raw, _teacher_job(cfg, method, features=False), pool)
    # Every partially tuned method shares RPT's split, hence one cache (keyed by the backbone's weights).
    cache = run_dir(cfg) / "feature_cache" / build_method(method, cfg.large).backbone_key()[:16]
    if not (cache / "manifest.json").is_file():
        t0 = time.perf_counter()
        n = write_feature_cache(cfg.data.train_shards, _teacher_job(cfg, method, features=True), pool, cache,
                                total=count_samples(cfg.data.train_shards), num_classes=cfg.robust_teacher.num_classes,
                                seed=cfg.run.seed)
        (cache / "generation.json").write_text(json.dumps({"samples": n, "seconds": time.perf_counter() - t0}))
    raw = read_raw(str(cache), epochs=cfg.run.epochs, seed=cfg.run.seed, resume=resume)
    return raw.map_batches(decode_feature_cache, batch_size=pool.batch_size)


def train_method(cfg: RptRecipeConfig, method: str) -> Path:
    out = run_dir(cfg) / method
    world = cfg.pools.student.num_workers
    steps = count_samples(cfg.data.train_shards) // (world * cfg.optim.micro_batch_size * cfg.optim.grad_accum)
    if steps < 1:
        raise ValueError("fewer training samples than one global batch: lower optim.micro_batch_size")
    resume = ResumePoint.remote()
    job = StudentJob(task=RptTask(method, cfg.large, cfg.loss, cfg.select), optim=cfg.optim, epochs=cfg.run.epochs,
                     steps_per_epoch=steps, run_dir=str(out), checkpoint_every=cfg.run.checkpoint_every,
                     log_every=cfg.run.log_every, resume=resume, export_stem="model")
    fit_students(job, _stream(cfg, method, resume), cfg.pools.student, name=f"{cfg.run.name}-{method}",
                 storage_path=cfg.run.storage_path or str(run_dir(cfg) / "ray"), max_failures=cfg.run.max_failures,
                 execution=execution_options(cfg.data.max_in_flight_mb * 2**20))
    return out


def wise_ft_models(cfg: RptRecipeConfig, finetuned: Path) -> dict[str, Path]:
    """WiSE-FT: theta = (1 - alpha) theta_0 + alpha theta_ft for each alpha, exported like the others."""
    student = build_method("full_finetune", cfg.large)
    theta_0 = {k: v.clone() for k, v in student.state_dict().items()}
    theta_ft = load_file(finetuned / "model.safetensors")
    out = {}
    for alpha in cfg.run.wise_alphas:
        name = f"{WISE_FT}_{alpha:g}"
        student.load_state_dict(wise_ft(theta_0, theta_ft, alpha))
        export_rpt(student, run_dir(cfg) / name, stem="model", method="full_finetune", cfg=cfg.large, select=cfg.select)
        out[name] = run_dir(cfg) / name
    return out


def run(cfg: RptRecipeConfig, *, extra_models: dict[str, Path] | None = None) -> dict:
    check_config(cfg)
    out = run_dir(cfg)
    begin_run(cfg, out, cfg.pools)
    models, costs = {}, {}
    for method in [m for m in cfg.run.methods if m != WISE_FT]:
        t0 = time.perf_counter()
        models[method] = train_method(cfg, method)
        costs[method] = time.perf_counter() - t0
    if WISE_FT in cfg.run.methods:
        wise = wise_ft_models(cfg, models["full_finetune"])
        models |= wise
        costs |= {name: costs["full_finetune"] for name in wise}
    models |= extra_models or {}
    return evaluate_models(models, cfg.data.test_shards, cfg.eval, pools=cfg.pools.teacher, out_dir=out,
                           costs_s=costs)
