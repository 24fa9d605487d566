"""The RPT job (seed 002): tune the last layers of a large pretrained model with each method through the
pools, interpolate WiSE-FT, evaluate, report.

    read tasks (crop, AugMix view) -> teacher pool (initial model on the crop, robust teacher on the view
    [, the frozen backbone's features]) -> students (the tuned part and the heads)

With ``run.feature_cache`` the pool computes the frozen backbone's features once, writes them as shards,
and the partially tuned methods train from them for every epoch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from cluster.engine import batch as B
from cluster.engine.deepspeed_config import OptimConfig
from cluster.engine.evaluate import EvalConfig, check_eval, evaluate_models
from cluster.engine.pools import PoolsConfig, check_pools
from cluster.engine.prepare import Augment
from cluster.engine.ray_cluster import RayConfig
from cluster.engine.runner import (
    DataConfig, RunConfig, Trained, begin_training, check_classes, check_data, check_methods, check_model, check_run,
    report_seeds, run_dir, seed_dir, seeds, steps_per_epoch, train,
)  # fmt: skip
from cluster.engine.streams import (
    ResumePoint, count_samples, generate_once, generated_stream, sample_stream, write_generated,
)  # fmt: skip
from cluster.engine.tasks import RptTask
from cluster.engine.teacher_pool import through_pool
from cluster.engine.tracking import LoggingConfig, check_logging
from robust.augment import AugMixConfig, augmix_transform
from robust.models.clip_teacher import check_clip
from robust.models.precision import check_precision
from robust.models.timm_models import TimmConfig, build_timm
from robust.rpt.baselines import METHODS, build_method, wise_ft
from robust.rpt.export import export_rpt
from robust.rpt.losses import RptLossConfig
from robust.rpt.partial import PartialConfig
from robust.rpt.select import SelectConfig, check_select_config
from robust.rpt.targets import augmented_view, initial_teacher, rpt_targets
from robust.seeding import combine
from robust.train_transforms import TrainAugConfig, check_train_aug

WISE_FT = "wise_ft"  # not trained: interpolates the initial model and full_finetune's result
CACHE_COLUMNS = [B.FEATS, B.AUG_FEATS, B.TEACHER_LOGITS, B.AUG_TEACHER_LOGITS]


@dataclass
class RptRunConfig(RunConfig):
    name: str = "rpt"
    epochs: int = 10
    methods: list[str] = field(default_factory=lambda: ["rpt", "apt", "full_finetune", WISE_FT])
    wise_alphas: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    feature_cache: bool = True  # partially tuned methods train from cached backbone features


@dataclass
class RptConfig:
    data: DataConfig = field(default_factory=DataConfig)
    # the large pretrained model (checkpoint or pretrained tag) and which part of it is tuned
    large: PartialConfig = field(default_factory=lambda: PartialConfig(
        timm=TimmConfig(name="vit_base_patch16_224", num_classes=1000, pretrained=True)))
    robust_teacher: TimmConfig = field(default_factory=lambda: TimmConfig(name="resnet50", num_classes=1000))
    augment: TrainAugConfig = field(default_factory=lambda: TrainAugConfig(
        auto_augment="", re_prob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0))  # the clean crop
    augmix: AugMixConfig = field(default_factory=AugMixConfig)  # the augmented ("unclean") view
    loss: RptLossConfig = field(default_factory=RptLossConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pools: PoolsConfig = field(default_factory=PoolsConfig)
    run: RptRunConfig = field(default_factory=RptRunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    precision: str = "auto"  # the teacher pool's forwards: "auto" = bf16 on GPU, fp32 on CPU


@dataclass
class RptAugment:
    """The read tasks' work: the student's crop (``Augment``) and its AugMix view, from the samples' seeds."""

    crop: Augment
    augmix: AugMixConfig

    def __call__(self, images: list[np.ndarray], labels: np.ndarray, seeds: np.ndarray,
                 valid: np.ndarray) -> dict[str, np.ndarray]:
        if not hasattr(self, "_augmix"):
            self._augmix = augmix_transform(self.augmix)
        columns = self.crop(images, labels, seeds, valid)
        view = [augmented_view(x, self._augmix, seed=combine([s, 1])) for x, s in zip(columns[B.IMAGE], seeds)]
        return columns | {B.AUG_IMAGE: np.stack(view)}


@dataclass
class RptProducer:
    """The teacher pool's work: both teachers' logits, and M_b's features for the feature cache."""

    large: PartialConfig
    robust: TimmConfig
    method: str  # whose split defines M_b when ``features``
    features: bool
    precision: str

    def build(self, device: torch.device) -> tuple[Any, Any, Any]:
        backbone = build_method(self.method, self.large).backbone.to(device) if self.features else None
        return (initial_teacher(self.large, device=device),
                build_timm(self.robust).to(device).requires_grad_(False).eval(), backbone)

    def produce(self, models: tuple[Any, Any, Any], batch: dict[str, np.ndarray], *, device: torch.device) -> dict:
        initial, robust, backbone = models
        return rpt_targets(initial, robust, B.images(batch[B.IMAGE], device), B.images(batch[B.AUG_IMAGE], device),
                           precision=self.precision, backbone=backbone)


def check(cfg: RptConfig) -> dict:
    """Everything that can fail before Ray starts; returns the student's parameter counts."""
    manifest = check_data(cfg.data, what="RPT")
    check_run(cfg.run)
    check_logging(cfg.logging)
    check_methods(cfg.run.methods, [*METHODS, WISE_FT])
    check_pools(cfg.pools)
    steps_per_epoch(manifest.total, cfg.pools, cfg.optim)  # the optimizer config, and one global batch at least
    if cfg.large.source == "timm":
        check_model(cfg.large.timm, key="large.timm")
    elif cfg.large.source == "open_clip":
        check_clip(cfg.large.clip, key="large.clip")
    check_model(cfg.robust_teacher, key="robust_teacher")
    if WISE_FT in cfg.run.methods and "full_finetune" not in cfg.run.methods:
        raise ValueError("wise_ft interpolates full_finetune's result: add full_finetune to run.methods")
    if any(not 0 <= a <= 1 for a in cfg.run.wise_alphas):
        raise ValueError(f"run.wise_alphas {cfg.run.wise_alphas} must lie in [0, 1]")
    check_select_config(cfg.select)
    check_precision(cfg.precision)
    check_train_aug(cfg.augment)
    augmix_transform(cfg.augmix)  # a bad width/depth fails here
    check_eval(cfg.eval, cfg.data.test_shards)
    student = build_method("rpt", cfg.large)  # a bad tune_fraction / tune_from_block fails here
    check_classes(manifest.num_classes, large_model=student.num_classes, robust_teacher=cfg.robust_teacher.num_classes)
    return student.param_counts()


def _cached(cfg: RptConfig, method: str) -> bool:
    return cfg.run.feature_cache and METHODS[method].student == "partial"


def passes(cfg: RptConfig) -> dict[bool, list[str]]:
    """The trained methods by their stream: the feature cache (partially tuned methods, which share RPT's
    split) or images; the methods of a stream train together in one pass."""
    trained = [m for m in cfg.run.methods if m != WISE_FT]
    groups = {cached: [m for m in trained if _cached(cfg, m) == cached] for cached in (True, False)}
    return {cached: methods for cached, methods in groups.items() if methods}


def batch_bytes(cfg: RptConfig, classes: int, *, cached: bool, method: str) -> int:
    logits = {B.TEACHER_LOGITS: (classes,), B.AUG_TEACHER_LOGITS: (classes,)}
    if cached:  # a feature row, measured on the backbone
        student = build_method(method, cfg.large)
        with torch.no_grad():
            feats = tuple(student.backbone(torch.zeros(1, *student.info["input_size"])).shape[1:])
        return cfg.pools.teacher.batch_size * B.nbytes({B.FEATS: feats, B.AUG_FEATS: feats} | logits)
    image = (cfg.augment.crop_size, cfg.augment.crop_size, 3)
    return cfg.pools.teacher.batch_size * B.nbytes({B.IMAGE: image, B.AUG_IMAGE: image} | logits)


def stream(cfg: RptConfig, *, cached: bool, method: str, seed: int, classes: int, resume: Any) -> Any:
    augment = RptAugment(Augment(cfg.augment, classes), cfg.augmix)

    def samples(epochs: int):
        return sample_stream(cfg.data.train_shards, augment, epochs=epochs, seed=seed, num_classes=classes,
                             batch_size=cfg.pools.teacher.batch_size, resume=resume if epochs > 1 else None)

    if not cached:
        return through_pool(samples(cfg.run.epochs), RptProducer(cfg.large, cfg.robust_teacher, method, False,
                                                                 cfg.precision), cfg.pools.teacher)
    # one cache per seed, keyed by the backbone's weights and cut
    cache = seed_dir(cfg.run, seed) / "feature_cache" / build_method(method, cfg.large).backbone_key()[:16]
    producer = RptProducer(cfg.large, cfg.robust_teacher, method, True, cfg.precision)
    generate_once(cache, lambda: write_generated(through_pool(samples(1), producer, cfg.pools.teacher), cache,
                                                 columns=CACHE_COLUMNS, total=count_samples(cfg.data.train_shards),
                                                 desc="feature cache", num_classes=classes))
    return generated_stream(cache, columns=CACHE_COLUMNS, epochs=cfg.run.epochs, seed=seed,
                            batch_size=cfg.pools.teacher.batch_size, resume=resume)


def train_methods(cfg: RptConfig, *, seed: int, classes: int) -> dict[str, Trained]:
    suffix = f"-seed{seed}" if cfg.run.seeds else ""
    trained: dict[str, Trained] = {}
    for cached, methods in passes(cfg).items():
        resume = ResumePoint.remote()
        tasks = {m: RptTask(m, cfg.large, cfg.loss, cfg.select, cached=cached) for m in methods}
        trained |= train(tasks, stream(cfg, cached=cached, method=methods[0], seed=seed, classes=classes, resume=resume),
                         seed_dir(cfg.run, seed), name=f"{cfg.run.name}{suffix}", run=cfg.run, seed=seed, data=cfg.data,
                         pools=cfg.pools, optim=cfg.optim, total=count_samples(cfg.data.train_shards),
                         batch_bytes=batch_bytes(cfg, classes, cached=cached, method=methods[0]), resume=resume,
                         logging=cfg.logging)
    return trained


def wise_ft_models(cfg: RptConfig, finetuned: Trained, out: Path) -> dict[str, Trained]:
    """WiSE-FT: theta = (1 - alpha) theta_0 + alpha theta_ft for each alpha, exported like the others
    (their training cost is full fine-tuning's)."""
    student = build_method("full_finetune", cfg.large)
    theta_0 = {k: v.clone() for k, v in student.state_dict().items()}
    theta_ft = load_file(finetuned.path / "model.safetensors")
    models = {}
    for alpha in cfg.run.wise_alphas:
        name = f"{WISE_FT}_{alpha:g}"
        student.load_state_dict(wise_ft(theta_0, theta_ft, alpha))
        export_rpt(student, out / name, method="full_finetune", cfg=cfg.large, select=cfg.select)
        models[name] = dataclasses.replace(finetuned, path=out / name)
    return models


def run(cfg: RptConfig, *, extra_models: dict[str, Path] | None = None) -> dict:
    check(cfg)
    classes = cfg.robust_teacher.num_classes
    begin_training(cfg, cfg.pools, cfg.ray, cfg.run, teacher_pool=True)
    reports = {}
    for seed in seeds(cfg.run):
        out = seed_dir(cfg.run, seed)
        trained = train_methods(cfg, seed=seed, classes=classes)
        if WISE_FT in cfg.run.methods:
            trained |= wise_ft_models(cfg, trained["full_finetune"], out)
        reports[seed] = evaluate_models(trained, cfg.data.test_shards, cfg.eval, pools=cfg.pools.teacher,
                                        out_dir=out, logging=cfg.logging, extra=extra_models or {})
    return report_seeds(reports, run_dir(cfg.run))
