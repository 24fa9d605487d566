"""The robust-teacher job: RPT's small robust teacher trained on the student pool (SPEC 6) with AugMix
(+ JSD), PixMix and DeepAugment, any combination (AugMix + DeepAugment by default, as in the paper).

DeepAugment copies are generated once by the teacher pool (``cluster.engine.deepaugment``; the
image-to-image autoencoder: ``train.deepaugment.checkpoint``, else trained briefly on the first
``deepaugment_fit_images`` crops), ``train.deepaugment.copies`` copies of the training set, written as extra
shards; the students then stream the original and the DeepAugment shards together and make the AugMix /
PixMix views themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.engine import batch as B
from cluster.engine.deepaugment import check_deepaugment, deepaugment_shards
from cluster.engine.deepspeed_config import OptimConfig
from cluster.engine.evaluate import EvalConfig, check_eval, evaluate_models, held_out_set
from cluster.engine.pools import PoolsConfig, check_pools
from cluster.engine.prepare import Augment
from cluster.engine.ray_cluster import RayConfig
from cluster.engine.runner import (
    DataConfig, RunConfig, begin_training, check_classes, check_data, check_model, check_run, report_seeds, run_dir,
    seed_dir, seeds, steps_per_epoch, train,
)  # fmt: skip
from cluster.engine.streams import ResumePoint, count_samples, sample_stream
from cluster.engine.tasks import RobustTeacherTask
from cluster.engine.tracking import LoggingConfig, check_logging
from robust.eval.sets import timm_data_config
from robust.models.timm_models import TimmConfig
from robust.teacher_train import RobustTeacherConfig, check_augmentations
from robust.train_transforms import TrainAugConfig, check_train_aug

@dataclass
class TeacherRunConfig(RunConfig):
    name: str = "robust-teacher"
    epochs: int = 90


@dataclass
class RobustTeacherJobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    train: RobustTeacherConfig = field(default_factory=lambda: RobustTeacherConfig(
        model=TimmConfig(name="resnet50", num_classes=1000)))
    deepaugment_fit_images: int = 5000  # crops the autoencoder is trained on when no checkpoint is given
    augment: TrainAugConfig = field(default_factory=lambda: TrainAugConfig(
        auto_augment="", re_prob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0))  # the crop; views on workers
    optim: OptimConfig = field(default_factory=OptimConfig)
    pools: PoolsConfig = field(default_factory=PoolsConfig)
    run: TeacherRunConfig = field(default_factory=TeacherRunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def check(cfg: RobustTeacherJobConfig) -> int:
    manifest = check_data(cfg.data, what="the robust teacher")
    check_run(cfg.run)
    check_logging(cfg.logging)
    check_pools(cfg.pools)
    steps_per_epoch(manifest.total, cfg.pools, cfg.optim)  # the optimizer config, and one global batch at least
    check_model(cfg.train.model, key="train.model")
    if "deepaugment" in cfg.train.augmentations:
        check_deepaugment(cfg.train.deepaugment, cfg.deepaugment_fit_images, crop_size=cfg.augment.crop_size,
                          key="train.deepaugment", fit_key="deepaugment_fit_images")
    check_augmentations(cfg.train)
    check_train_aug(cfg.augment)
    if cfg.data.test_shards:
        check_eval(cfg.eval, cfg.data.test_shards)
    return check_classes(manifest.num_classes, model=cfg.train.model.num_classes)


def run(cfg: RobustTeacherJobConfig) -> dict:
    classes = check(cfg)
    begin_training(cfg, cfg.pools, cfg.ray, cfg.run, teacher_pool="deepaugment" in cfg.train.augmentations)
    reports = {}
    for seed in seeds(cfg.run):
        out, suffix = seed_dir(cfg.run, seed), f"-seed{seed}" if cfg.run.seeds else ""
        sources = [cfg.data.train_shards]
        if "deepaugment" in cfg.train.augmentations:
            sources.append(str(deepaugment_shards(
                cfg.data.train_shards, out / "deepaugment", cfg=cfg.train.deepaugment, crop=cfg.augment,
                fit_images=cfg.deepaugment_fit_images, seed=seed, classes=classes, pool=cfg.pools.teacher)))
        resume = ResumePoint.remote()
        stream = sample_stream(sources, Augment(cfg.augment, classes), epochs=cfg.run.epochs, seed=seed,
                               batch_size=cfg.pools.teacher.batch_size, num_classes=classes, resume=resume)
        image = (cfg.augment.crop_size, cfg.augment.crop_size, 3)
        export = timm_data_config(held_out_set(cfg.data.test_shards, cfg.eval)) if cfg.data.test_shards else {}
        trained = train({"teacher": RobustTeacherTask(cfg.train, export)}, stream, out, name=f"{cfg.run.name}{suffix}",
                        run=cfg.run, seed=seed, data=cfg.data, pools=cfg.pools, optim=cfg.optim,
                        total=count_samples(sources), batch_bytes=cfg.pools.teacher.batch_size * B.nbytes({B.IMAGE: image}),
                        resume=resume, logging=cfg.logging)
        if cfg.data.test_shards:
            reports[seed] = evaluate_models(trained, cfg.data.test_shards, cfg.eval, pools=cfg.pools.teacher, out_dir=out,
                                            logging=cfg.logging)
    return report_seeds(reports, run_dir(cfg.run)) if reports else {"models": {}}
