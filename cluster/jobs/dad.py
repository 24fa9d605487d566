"""The DAD job (seed 000): one student per method, trained together in one pass, evaluated and reported.

    read tasks (decode, the student's augmentation) -> teacher pool (teacher logits; DAD samples) -> students

``ce`` trains on the augmented images alone, ``kd`` adds the teacher's logits, ``dad`` adds the discrete
adversarial samples and the teacher's logits on them; ``dat``, the baseline, attacks the student itself
(its discretizer runs on the student workers). The students of a run share one stream, so they
see the same batches in the same order (paired) and the teacher pool works once for all of them; a run
of CE alone needs no teacher pool. ``dad.mode=offline`` generates the DAD samples once into shards and
trains every epoch from them. With ``run.seeds`` the pass runs once per seed and the report adds the
paired study.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster.engine import batch as B
from cluster.engine.deepspeed_config import OptimConfig
from cluster.engine.evaluate import EvalConfig, check_eval, evaluate_models, held_out_set
from cluster.engine.pools import PoolsConfig, check_pools
from cluster.engine.prepare import Augment
from cluster.engine.ray_cluster import RayConfig
from cluster.engine.runner import (
    DataConfig, RunConfig, Trained, begin_training, check_classes, check_data, check_in_flight, check_methods,
    check_model, check_path, check_run, report_seeds, run_dir, seed_dir, seeds, steps_per_epoch, train,
)  # fmt: skip
from cluster.engine.streams import (
    ResumePoint, count_samples, generate_once, generated_stream, sample_stream, write_generated,
)  # fmt: skip
from cluster.engine.tasks import DatTask, DistillTask
from cluster.engine.teacher_pool import through_pool
from cluster.engine.tracking import LoggingConfig, check_logging
from robust.attacks.dad import DADConfig
from robust.attacks.pgd import check_pgd_config
from robust.distill import TeacherConfig, build_teacher, teacher_targets
from robust.models.clip_teacher import check_clip
from robust.losses.objectives import ObjectiveConfig
from robust.losses.soft_targets import topk_soft_targets
from robust.models.timm_models import TimmConfig
from robust.eval.sets import timm_data_config
from robust.models.precision import check_precision
from robust.models.vqgan import VQGANConfig, build_vqgan
from robust.seeding import combine, generator
from robust.train_transforms import TrainAugConfig, check_train_aug, to_uint8

METHODS = ("ce", "kd", "dat", "dad")
TEACHER_METHODS = {"kd", "dad"}  # the methods that read the teacher pool's output
MODES = ("online", "offline")
DAD_COLUMNS = [B.IMAGE, B.TEACHER_LOGITS, B.DAD_IMAGE, B.DAD_TEACHER_LOGITS]


@dataclass
class DadSection(DADConfig):
    mode: str = "online"  # online: fresh DAD samples every epoch; offline: generate once, train from shards
    alpha: float | None = None  # the attack's step; None: the official scripts' 0.1 online, 0.01 offline
    # k > 0: the teacher pool emits (and offline shards store) the teacher's top-k log-probabilities
    # (batch.TOPK) instead of all its logits; the students expand them (robust.losses.soft_targets). 0: all.
    soft_targets_topk: int = 0


def attack(cfg: DadSection) -> DADConfig:
    """The DAD budget the teacher pool runs: ``cfg`` with its step resolved by the mode."""
    step = cfg.alpha if cfg.alpha is not None else (0.1 if cfg.mode == "online" else 0.01)
    return DADConfig(norm=cfg.norm, eps=cfg.eps, alpha=step, steps=cfg.steps, random_start_prob=cfg.random_start_prob,
                     random_start_scale=cfg.random_start_scale)


@dataclass
class DadRunConfig(RunConfig):
    name: str = "dad-imagenet"
    methods: list[str] = field(default_factory=lambda: ["dad"])


@dataclass
class DadConfig:
    """Defaults: the official ViT-B/16 recipe (SPEC 4): a pretrained ViT-B/16 fine-tuned 30 epochs from CLIP
    ViT-L/14 zero-shot with the DeiT augmentation (RandAugment, mixup 0.8, CutMix 1.0, label smoothing 0.1,
    random erasing 0.25), drop path 0.25, EMA 0.99992, AdamW lr 1e-4 at global batch 256 (8 workers x 32),
    weight decay 0.05, 5 warm-up epochs from 1e-6, then cosine, gradient clipping 0.99."""

    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    dad: DadSection = field(default_factory=DadSection)
    augment: TrainAugConfig = field(default_factory=TrainAugConfig)
    student: TimmConfig = field(default_factory=lambda: TimmConfig(
        name="vit_base_patch16_224", num_classes=1000, pretrained=True, drop_path_rate=0.25))
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        zero_stage=2, micro_batch_size=32, lr=1e-4, weight_decay=0.05, grad_clip=0.99, warmup_epochs=5.0,
        warmup_start_ratio=0.01, ema_decay=0.99992))
    pools: PoolsConfig = field(default_factory=PoolsConfig)
    run: DadRunConfig = field(default_factory=DadRunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class DistillProducer:
    """The teacher pool's work: the teacher's logits on each image (or their top ``topk``); with a VQGAN,
    DAD samples too."""

    teacher: TeacherConfig
    vqgan: VQGANConfig | None
    dad: DADConfig
    topk: int = 0  # dad.soft_targets_topk

    def build(self, device: torch.device) -> tuple[Any, Any]:
        return build_teacher(self.teacher, device=device), (
            build_vqgan(self.vqgan, device=device) if self.vqgan is not None else None)

    def produce(self, models: tuple[Any, Any], batch: dict[str, np.ndarray], *, device: torch.device) -> dict:
        teacher, vqgan = models
        # a batch's random starts come from its samples' seeds: a redone batch is the same batch
        out = teacher_targets(teacher, B.images(batch[B.IMAGE], device), B.targets(batch, device),
                              precision=self.teacher.precision, vqgan=vqgan, dad=self.dad,
                              generator=generator(combine(batch[B.SEED]), device))
        columns = {B.TEACHER_LOGITS: out["teacher_logits"]}
        if vqgan is not None:
            columns |= {B.DAD_IMAGE: to_uint8(out["dad_image"]).permute(0, 2, 3, 1),
                        B.DAD_TEACHER_LOGITS: out["dad_teacher_logits"]}
        if self.topk:
            for name in [n for n in columns if n in B.TOPK]:
                columns |= dict(zip(B.TOPK[name], topk_soft_targets(columns.pop(name), k=self.topk)))
        return columns


def check(cfg: DadConfig) -> int:
    """Everything that can be checked before Ray starts; returns the number of classes."""
    manifest = check_data(cfg.data, what="DAD")
    check_run(cfg.run)
    check_logging(cfg.logging)
    check_methods(cfg.run.methods, METHODS)
    check_pools(cfg.pools)
    steps_per_epoch(manifest.total, cfg.pools, cfg.optim)  # the optimizer config, and one global batch at least
    check_model(cfg.student, key="student")
    if cfg.teacher.kind == "timm":
        check_model(cfg.teacher.timm, key="teacher.timm")
    elif cfg.teacher.kind == "clip":
        check_clip(cfg.teacher.clip, key="teacher.clip")
    else:
        raise ValueError(f"teacher.kind must be 'clip' or 'timm', got {cfg.teacher.kind!r}")
    check_path(cfg.vqgan.checkpoint, key="vqgan.checkpoint", what="a taming VQGAN .ckpt or .safetensors file")
    if cfg.dad.mode not in MODES:
        raise ValueError(f"dad.mode must be one of {MODES}, got {cfg.dad.mode!r}")
    check_pgd_config(attack(cfg.dad), key="dad")
    check_precision(cfg.teacher.precision, key="teacher.precision")
    check_train_aug(cfg.augment)
    check_eval(cfg.eval, cfg.data.test_shards)
    classes = check_classes(manifest.num_classes, student=cfg.student.num_classes, teacher=cfg.teacher.num_classes)
    topk = cfg.dad.soft_targets_topk
    if topk and not 1 <= topk < classes:
        raise ValueError(f"dad.soft_targets_topk={topk} must be 0 (the teacher's full logits) or a k in "
                         f"[1, {classes}) (fewer than the {classes} classes); set dad.soft_targets_topk to one of them")
    check_in_flight(cfg.data, batch_bytes=batch_bytes(cfg, classes))
    return classes


def batch_bytes(cfg: DadConfig, classes: int) -> int:
    image, logits = (cfg.augment.crop_size, cfg.augment.crop_size, 3), (classes,)
    row = {B.IMAGE: image, B.TARGET: logits, B.TEACHER_LOGITS: logits}
    if "dad" in cfg.run.methods:
        row |= {B.DAD_IMAGE: image, B.DAD_TEACHER_LOGITS: logits}
    if topk := cfg.dad.soft_targets_topk:
        row = {c: row.get(c, (topk,)) for c in B.compact(row)}
    return cfg.pools.teacher.batch_size * B.nbytes(row)


def stream(cfg: DadConfig, seed: int, classes: int, resume: Any) -> Any:
    """The batches every method's student trains on: the augmented samples, through the teacher pool
    unless every method is CE (with DAD samples when a method is DAD; offline: generated once)."""
    augment, methods = Augment(cfg.augment, classes), set(cfg.run.methods)

    def samples(epochs: int):
        return sample_stream(cfg.data.train_shards, augment, epochs=epochs, seed=seed, num_classes=classes,
                             batch_size=cfg.pools.teacher.batch_size, resume=resume if epochs > 1 else None)

    producer = DistillProducer(cfg.teacher, cfg.vqgan if "dad" in methods else None, attack(cfg.dad),
                               topk=cfg.dad.soft_targets_topk)
    if not methods & TEACHER_METHODS:
        return samples(cfg.run.epochs)
    if "dad" not in methods or cfg.dad.mode == "online":
        return through_pool(samples(cfg.run.epochs), producer, cfg.pools.teacher)
    shards = seed_dir(cfg.run, seed) / "dad_shards"  # generated once per seed, reused by restarts
    columns = (B.compact(DAD_COLUMNS) if cfg.dad.soft_targets_topk else DAD_COLUMNS) + (
        [B.TARGET] if cfg.augment.soft_targets else [])
    generate_once(shards, lambda: write_generated(through_pool(samples(1), producer, cfg.pools.teacher), shards,
                                                  columns=columns, total=count_samples(cfg.data.train_shards),
                                                  desc="offline DAD", num_classes=classes))
    return generated_stream(shards, columns=columns, epochs=cfg.run.epochs, seed=seed,
                            batch_size=cfg.pools.teacher.batch_size, resume=resume)


def kind(cfg: DadConfig, method: str) -> str:
    """The student loss of ``method`` (robust.losses.objectives)."""
    return f"dad_{cfg.dad.mode}" if method == "dad" else method


def train_students(cfg: DadConfig, *, seed: int, classes: int) -> dict[str, Trained]:
    """Every method's student in one pass over the stream: the same batches, in the same order."""
    resume = ResumePoint.remote()
    export = timm_data_config(held_out_set(cfg.data.test_shards, cfg.eval))
    tasks = {m: DatTask(cfg.student, "dat", cfg.objective, export, vqgan=cfg.vqgan, attack=attack(cfg.dad),
                        precision=cfg.teacher.precision) if m == "dat"
             else DistillTask(cfg.student, kind(cfg, m), cfg.objective, export,
                              topk_targets=cfg.dad.soft_targets_topk > 0) for m in cfg.run.methods}
    suffix = f"-seed{seed}" if cfg.run.seeds else ""
    return train(tasks, stream(cfg, seed, classes, resume), seed_dir(cfg.run, seed), name=f"{cfg.run.name}{suffix}",
                 run=cfg.run, seed=seed, data=cfg.data, pools=cfg.pools, optim=cfg.optim,
                 total=count_samples(cfg.data.train_shards), batch_bytes=batch_bytes(cfg, classes), resume=resume,
                 logging=cfg.logging)


def run(cfg: DadConfig, *, extra_models: dict[str, Path] | None = None) -> dict:
    """Train every method's student (per seed), evaluate them and ``extra_models``, write the report."""
    classes = check(cfg)
    begin_training(cfg, cfg.pools, cfg.ray, cfg.run, teacher_pool=bool(set(cfg.run.methods) & TEACHER_METHODS))
    reports = {}
    for seed in seeds(cfg.run):
        trained = train_students(cfg, seed=seed, classes=classes)
        reports[seed] = evaluate_models(trained, cfg.data.test_shards, cfg.eval, pools=cfg.pools.teacher,
                                        out_dir=seed_dir(cfg.run, seed), logging=cfg.logging,
                                        extra=extra_models or {})
    return report_seeds(reports, run_dir(cfg.run))
