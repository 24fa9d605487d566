"""The RPT job (seed 002): tune the last layers of a large pretrained model with each method through the
pools, interpolate WiSE-FT, evaluate, report.

Tuning data (sec. 4.3, appendix G): every epoch trains on every training image once as a clean sample (its
crop) and on a fraction ``augmented.fraction`` (a) of the complete augmented data D_aug, each augmented
candidate drawn with probability a from (run seed, epoch, its key). D_aug holds AugMix views of the training
images and of their DeepAugment copies (DeepAugment+AugMix as Hendrycks et al. 2021: the copies generated
once by the teacher pool, ``cluster.engine.deepaugment``; AugMix on the fly), or one of the two
(``augmented.sources``). A row is one sample, clean or augmented (``batch.AUGMENTED``: beta of eq. 5):

    read tasks (crop; the rows: clean samples and the drawn augmented ones, keyed aug-<key>, AugMix views)
    -> teacher pool (the initial model on the clean rows, the robust teacher on every row [, the frozen
    backbone's features]) -> students (the tuned part and the heads)

With ``run.feature_cache`` the pool computes the frozen backbone's features of ``run.cache_copies`` epochs of
every candidate once (fresh crops and views per epoch), writes them as shards, and the partially tuned
methods train from them: each epoch reads one of the copies per sample, drawn from (seed, epoch, key), and
draws its augmented share from them as the uncached stream does.

An epoch's augmented share is a binomial draw, so its length varies: the steps are counted on its expected
length and the stream runs one spare epoch, so that a short draw never ends it early (rows past the last
step are left unread; a resumed run restarts the data at its epoch, which may differ from an unbroken run's
rows by that drift).
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
from cluster.engine.deepaugment import check_deepaugment, deepaugment_shards, is_copy
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
    ResumePoint, count_samples, generate_once, generated_copy_key, generated_stream, sample_stream, write_generated,
)  # fmt: skip
from cluster.engine.tasks import RptTask
from cluster.engine.teacher_pool import through_pool
from cluster.engine.tracking import LoggingConfig, check_logging
from robust.augment import AugMixConfig, augmix_transform
from robust.cache import cache_dir_for
from robust.deepaugment import DeepAugConfig
from robust.models.clip_teacher import check_clip
from robust.models.precision import check_precision
from robust.models.timm_models import TimmConfig, build_timm
from robust.rpt.baselines import METHODS, build_method, wise_ft
from robust.rpt.export import export_rpt
from robust.rpt.losses import RptLossConfig
from robust.rpt.partial import PartialConfig
from robust.rpt.select import SelectConfig, check_select_config
from robust.rpt.targets import augmented_view, draw_augmented, initial_teacher, rpt_targets
from robust.seeding import sample_seeds
from robust.train_transforms import TrainAugConfig, check_train_aug

WISE_FT = "wise_ft"  # not trained: interpolates the initial model and full_finetune's result
CACHE_COLUMNS = [B.FEATS, B.TEACHER_LOGITS, B.ROBUST_LOGITS]
SOURCES = ("augmix", "deepaugment")
AUG_PREFIX = "aug-"  # an augmented sample's key: the prefix and the key of the row it was made from


@dataclass
class AugmentedConfig:
    """The augmented ("unclean") half of the tuning data (module docstring; appendix G: a = 0.5 of
    DeepAugment+AugMix data)."""

    fraction: float = 0.5  # a: each augmented candidate's probability to be in an epoch (Fig. 6 varies it)
    sources: list[str] = field(default_factory=lambda: list(SOURCES))
    augmix: AugMixConfig = field(default_factory=AugMixConfig)  # the views (its JSD fields are the teacher's)
    deepaugment: DeepAugConfig = field(default_factory=DeepAugConfig)  # copies: of the training set, per seed
    deepaugment_fit_images: int = 5000  # crops the autoencoder is trained on when no checkpoint is given


@dataclass
class RptRunConfig(RunConfig):
    name: str = "rpt"
    epochs: int = 10
    methods: list[str] = field(default_factory=lambda: ["rpt", "apt", "full_finetune", WISE_FT])
    wise_alphas: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    feature_cache: bool = True  # partially tuned methods train from cached backbone features
    cache_copies: int = 4  # epochs of crops and views the feature cache holds; each epoch reads one per sample


@dataclass
class RptConfig:
    data: DataConfig = field(default_factory=DataConfig)
    # the large pretrained model (checkpoint or pretrained tag) and which part of it is tuned
    large: PartialConfig = field(default_factory=lambda: PartialConfig(
        timm=TimmConfig(name="vit_base_patch16_224", num_classes=1000, pretrained=True)))
    robust_teacher: TimmConfig = field(default_factory=lambda: TimmConfig(name="resnet50", num_classes=1000))
    augment: TrainAugConfig = field(default_factory=lambda: TrainAugConfig(
        auto_augment="", re_prob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0))  # the clean crop
    augmented: AugmentedConfig = field(default_factory=AugmentedConfig)
    loss: RptLossConfig = field(default_factory=RptLossConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    # appendix G: Adam (no weight decay), lr 1e-3, batch 256 (8 student workers x 32)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(micro_batch_size=32, lr=1e-3, weight_decay=0.0))
    pools: PoolsConfig = field(default_factory=PoolsConfig)
    run: RptRunConfig = field(default_factory=RptRunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    precision: str = "auto"  # the teacher pool's forwards: "auto" = bf16 on GPU, fp32 on CPU


@dataclass
class RptRows:
    """The read tasks' step after the crop: each row of the stream becomes its samples. An original image
    gives its clean sample (the crop) and, with AugMix, an augmented candidate (the crop's AugMix view); a
    DeepAugment copy gives an augmented candidate (its crop, AugMix'd with AugMix). A candidate is keyed
    ``aug-<key>``, seeded by (run seed, epoch, that key), and kept with probability ``fraction``; it
    follows the row it was made from."""

    augmented: AugmentedConfig
    fraction: float  # 0: clean samples only (a pass of clean-only methods); 1: every candidate (the cache)
    seed: int

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = batch[B.KEY].astype(str)
        copy = is_copy(keys) if "deepaugment" in self.augmented.sources else np.zeros(len(keys), dtype=bool)
        clash = np.char.startswith(keys, AUG_PREFIX) & ~copy
        if clash.any():  # the feature cache tells augmented samples by their key
            raise ValueError(f"sample key {keys[clash][0]!r} starts with {AUG_PREFIX!r}, which marks RPT's augmented "
                             "samples; rename the sample in the training shards")
        aug_keys = np.char.add(AUG_PREFIX, keys)
        aug_seeds = sample_seeds(self.seed, batch[B.EPOCH], aug_keys)
        drawn = batch[B.VALID] & (copy | ("augmix" in self.augmented.sources)) & (self.fraction > 0)
        drawn &= draw_augmented(aug_seeds, fraction=self.fraction)
        # (row, augmented) pairs in stream order: each original's clean sample, then its candidate if drawn
        src, aug = np.repeat(np.arange(len(keys)), 2), np.tile([False, True], len(keys))
        take = np.where(aug, drawn[src], ~copy[src])
        src, aug = src[take], aug[take]
        out = {name: column[src] for name, column in batch.items()}
        out[B.KEY] = np.where(aug, aug_keys[src], keys[src])
        out[B.SEED] = np.where(aug, aug_seeds[src], batch[B.SEED][src])
        if "augmix" in self.augmented.sources and aug.any():
            if not hasattr(self, "_augmix"):  # built once per read task
                self._augmix = augmix_transform(self.augmented.augmix)
            out[B.IMAGE][aug] = np.stack([augmented_view(x, self._augmix, seed=int(s)) for x, s in
                                          zip(out[B.IMAGE][aug], out[B.SEED][aug])])
        return B.build({**out, B.AUGMENTED: aug})


@dataclass
class CachedRows:
    """A training epoch's rows from the feature cache, which holds every candidate: the clean samples and
    the augmented ones drawn as ``RptRows`` draws them (same seeds: the same samples as without the cache).
    The shard schema stores no flag: the key says which rows are augmented."""

    fraction: float

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        aug = np.char.startswith(batch[B.KEY].astype(str), AUG_PREFIX)
        keep = ~aug | draw_augmented(batch[B.SEED], fraction=self.fraction)
        return B.build({**{name: column[keep] for name, column in batch.items()}, B.AUGMENTED: aug[keep]})


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
        return rpt_targets(initial, robust, B.images(batch[B.IMAGE], device),
                           augmented_B=torch.from_numpy(batch[B.AUGMENTED]), precision=self.precision, backbone=backbone)


def check_augmented(cfg: AugmentedConfig, *, crop_size: int) -> None:
    if not 0 < cfg.fraction <= 1:
        raise ValueError(f"augmented.fraction={cfg.fraction} must lie in (0, 1]: the share of the augmented data "
                         "each epoch trains on (the paper's a = 0.5)")
    if not cfg.sources or set(cfg.sources) - set(SOURCES) or len(set(cfg.sources)) != len(cfg.sources):
        raise ValueError(f"augmented.sources {cfg.sources} must list distinct sources out of {list(SOURCES)}")
    try:
        augmix_transform(cfg.augmix)
    except ValueError as err:
        raise ValueError(f"augmented.augmix: {err}") from None
    if "deepaugment" in cfg.sources:
        check_deepaugment(cfg.deepaugment, cfg.deepaugment_fit_images, crop_size=crop_size, key="augmented.deepaugment",
                          fit_key="augmented.deepaugment_fit_images")


def check(cfg: RptConfig) -> dict:
    """Everything that can fail before Ray starts; returns the student's parameter counts."""
    manifest = check_data(cfg.data, what="RPT")
    check_run(cfg.run)
    if cfg.run.cache_copies < 1:
        raise ValueError(f"run.cache_copies={cfg.run.cache_copies} must be >= 1 (epochs of views the feature cache holds)")
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
    check_augmented(cfg.augmented, crop_size=cfg.augment.crop_size)
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
    row = {B.AUGMENTED: (), B.TEACHER_LOGITS: (classes,), B.ROBUST_LOGITS: (classes,)}
    if cached:  # a feature row, measured on the backbone
        student = build_method(method, cfg.large)
        with torch.no_grad():
            feats = tuple(student.backbone(torch.zeros(1, *student.info["input_size"])).shape[1:])
        return cfg.pools.teacher.batch_size * B.nbytes({B.FEATS: feats} | row)
    image = (cfg.augment.crop_size, cfg.augment.crop_size, 3)
    return cfg.pools.teacher.batch_size * B.nbytes({B.IMAGE: image} | row)


def sources(cfg: RptConfig, *, seed: int, classes: int) -> list[str]:
    """The shard sets the stream reads: the training set, and its DeepAugment copies (generated once per seed)."""
    out = [cfg.data.train_shards]
    if "deepaugment" in cfg.augmented.sources:
        a = cfg.augmented
        key = {"deepaugment": a.deepaugment, "crop": cfg.augment, "fit_images": a.deepaugment_fit_images}
        out.append(str(deepaugment_shards(cfg.data.train_shards, cache_dir_for(seed_dir(cfg.run, seed), "deepaugment", key),
                                          cfg=a.deepaugment, crop=cfg.augment, fit_images=a.deepaugment_fit_images,
                                          seed=seed, classes=classes, pool=cfg.pools.teacher)))
    return out


def epoch_rows(cfg: RptConfig, shard_sets: list[str], *, fraction: float) -> int:
    """An epoch's expected row count: every training sample, and ``fraction`` of the augmented candidates."""
    clean = count_samples(cfg.data.train_shards)
    candidates = (clean if "augmix" in cfg.augmented.sources else 0) + count_samples(shard_sets[1:])
    return clean + round(fraction * candidates)


def _copy_keys(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The cache's keys: an epoch's rows are version ``epoch`` of their samples."""
    return {**batch, B.KEY: np.array([generated_copy_key(int(e), k) for e, k in zip(batch[B.EPOCH], batch[B.KEY])])}


def feature_cache(cfg: RptConfig, *, method: str, seed: int, classes: int) -> Path:
    """``run.cache_copies`` epochs of every sample and augmented candidate through the pool once (M_b's features
    and both teachers' logits), one cache per seed, keyed by the backbone's weights and what makes the rows."""
    student = build_method(method, cfg.large)
    key = {"backbone": student.backbone_key(), "large": cfg.large, "robust_teacher": cfg.robust_teacher,
           "augment": cfg.augment, "augmented": dataclasses.replace(cfg.augmented, fraction=1.0),
           "copies": cfg.run.cache_copies, "precision": cfg.precision}
    cache = cache_dir_for(seed_dir(cfg.run, seed) / "feature_cache", "feats", key)
    shard_sets, copies = sources(cfg, seed=seed, classes=classes), cfg.run.cache_copies

    def make() -> int:
        rows = sample_stream(shard_sets, Augment(cfg.augment, classes), epochs=copies, seed=seed, num_classes=classes,
                             batch_size=cfg.pools.teacher.batch_size).map_batches(RptRows(cfg.augmented, 1.0, seed))
        stream = through_pool(rows, RptProducer(cfg.large, cfg.robust_teacher, method, True, cfg.precision),
                              cfg.pools.teacher)
        return write_generated(stream.map_batches(_copy_keys) if copies > 1 else stream, cache, columns=CACHE_COLUMNS,
                               total=copies * epoch_rows(cfg, shard_sets, fraction=1.0), desc="feature cache",
                               num_classes=classes)

    return generate_once(cache, make)


def stream(cfg: RptConfig, methods: list[str], *, cached: bool, seed: int, classes: int,
           resume: Any) -> tuple[Any, int]:
    """The pass's stream and its epoch's expected row count; augmented samples only when a method trains on them."""
    fraction = cfg.augmented.fraction if any(METHODS[m].augmented for m in methods) else 0.0
    shard_sets = sources(cfg, seed=seed, classes=classes) if fraction else [cfg.data.train_shards]
    epochs = cfg.run.epochs + (1 if 0 < fraction < 1 or cached else 0)  # the spare epoch (module docstring)
    rows = epoch_rows(cfg, shard_sets, fraction=fraction)
    if cached:
        cache = feature_cache(cfg, method=methods[0], seed=seed, classes=classes)
        return generated_stream(cache, columns=CACHE_COLUMNS, epochs=epochs, seed=seed, copies=cfg.run.cache_copies,
                                batch_size=cfg.pools.teacher.batch_size, resume=resume).map_batches(
            CachedRows(fraction)), rows
    samples = sample_stream(shard_sets, Augment(cfg.augment, classes), epochs=epochs, seed=seed, num_classes=classes,
                            batch_size=cfg.pools.teacher.batch_size, resume=resume)
    producer = RptProducer(cfg.large, cfg.robust_teacher, methods[0], False, cfg.precision)
    return through_pool(samples.map_batches(RptRows(cfg.augmented, fraction, seed)), producer, cfg.pools.teacher), rows


def train_methods(cfg: RptConfig, *, seed: int, classes: int) -> dict[str, Trained]:
    suffix = f"-seed{seed}" if cfg.run.seeds else ""
    trained: dict[str, Trained] = {}
    for cached, methods in passes(cfg).items():
        resume = ResumePoint.remote()
        tasks = {m: RptTask(m, cfg.large, cfg.loss, cfg.select, cached=cached) for m in methods}
        data, rows = stream(cfg, methods, cached=cached, seed=seed, classes=classes, resume=resume)
        trained |= train(tasks, data, seed_dir(cfg.run, seed), name=f"{cfg.run.name}{suffix}", run=cfg.run, seed=seed,
                         data=cfg.data, pools=cfg.pools, optim=cfg.optim, total=rows, resume=resume,
                         batch_bytes=batch_bytes(cfg, classes, cached=cached, method=methods[0]), logging=cfg.logging)
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
