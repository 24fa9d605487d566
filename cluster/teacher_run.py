"""Train the small robust teacher of RPT on the student pool (SPEC 6): AugMix (+ JSD), PixMix and
DeepAugment, any combination (AugMix + DeepAugment by default, as in the paper).

DeepAugment copies are generated once by an actor pool on the teacher resource (the image-to-image
autoencoder: ``deepaugment.checkpoint``, else trained briefly on the first ``run.deepaugment_fit_images``
training images) and written as extra shards; the students then stream the original and the
DeepAugment shards together and make the AugMix / PixMix views themselves.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm import tqdm

from cluster.config import TEACHER_RESOURCE, PoolsConfig
from cluster.ray_init import DataConfig, RayInitConfig, begin_run
from cluster.deepspeed_config import OptimConfig, validate_optim
from cluster.evaluate import EvalConfig, evaluate_models
from cluster.pipeline import ResumePoint, count_samples, execution_options, read_raw, shard_manifest
from cluster.student_pool import StudentJob, fit_students
from cluster.student_tasks import RobustTeacherTask
from cluster.teacher_pool import AugmentConfig, crop_transform
from robust.data.digits import build_digits_shards
from robust.data.shards import decode_image, encode_png, make_sample, write_shards
from robust.deepaugment import autoencoder_for, build_autoencoder, deepaugment
from robust.models.timm_models import TimmConfig
from robust.teacher_train import TeacherTrainConfig, check_augmentations


@dataclass
class TeacherRunSection:
    name: str = "robust-teacher"
    out_dir: str = "runs"
    storage_path: str = ""
    epochs: int = 90
    checkpoint_every: int = 500
    log_every: int = 20
    max_failures: int = 3
    seed: int = 0
    deepaugment_fit_images: int = 5000  # images the autoencoder is trained on when no checkpoint is given


@dataclass
class RobustTeacherRecipeConfig:
    data: DataConfig = field(default_factory=DataConfig)
    # model + augmentations (+ their configs); its epochs/lr/batch fields belong to the single-process loop
    train: TeacherTrainConfig = field(default_factory=lambda: TeacherTrainConfig(
        model=TimmConfig(name="resnet50", num_classes=1000)))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pools: PoolsConfig = field(default_factory=PoolsConfig)
    run: TeacherRunSection = field(default_factory=TeacherRunSection)
    ray: RayInitConfig = field(default_factory=RayInitConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


TEACHER_LOCAL_PRESET: dict = {
    "data": {"max_in_flight_mb": 64},
    "train": {"model": {"name": "test_resnet", "num_classes": 10}},
    "augment": {"crop_size": 32, "scale": [0.7, 1.0], "ratio": [0.9, 1.1], "hflip": False},
    "optim": {"zero_stage": 2, "micro_batch_size": 64, "lr": 3e-3, "weight_decay": 0.05, "warmup_steps": 10},
    "pools": {
        "teacher": {"min_actors": 1, "max_actors": 1, "gpus_per_actor": 0, "cpus_per_actor": 1, "batch_size": 64},
        "student": {"num_workers": 2, "gpus_per_worker": 0, "cpus_per_worker": 1},
    },
    "run": {"name": "robust-teacher-local", "epochs": 6, "checkpoint_every": 50, "log_every": 10,
            "deepaugment_fit_images": 1347},
    "ray": {"num_cpus": 4, "object_store_mb": 512},
}


def prepare_local(cfg: RobustTeacherRecipeConfig) -> None:
    """Point ``cfg`` at the digits shards (built once under ``<run.out_dir>/cache``)."""
    dirs = build_digits_shards(Path(cfg.run.out_dir).expanduser().resolve() / "cache" / "digits")
    cfg.data.train_shards, cfg.data.test_shards = str(dirs["train"]), str(dirs["test"])


def run_dir(cfg: RobustTeacherRecipeConfig) -> Path:
    return Path(cfg.run.out_dir).expanduser().resolve() / cfg.run.name


def check_config(cfg: RobustTeacherRecipeConfig) -> None:
    if not cfg.data.train_shards:
        raise ValueError("no training data: pass data.train_shards=/path/to/shards or run with preset=local")
    check_augmentations(cfg.train)
    validate_optim(cfg.optim)
    classes = shard_manifest(cfg.data.train_shards).num_classes
    if classes is not None and classes != cfg.train.model.num_classes:
        raise ValueError(f"the data has {classes} classes, train.model.num_classes is {cfg.train.model.num_classes}")


def decode_crops(rows: dict[str, np.ndarray], augment: AugmentConfig) -> dict[str, np.ndarray]:
    """Ray Data task: raw rows -> the student pool's batch format (random resized crop, uint8)."""
    crop, n = crop_transform(augment), len(rows["__key__"])
    valid, images = np.ones(n, dtype=bool), []
    for i, data in enumerate(rows["png" if "png" in rows else "jpg"]):
        try:
            im = torch.from_numpy(decode_image(data).copy()).permute(2, 0, 1)
        except Exception:  # noqa: BLE001 - undecodable bytes: skip the sample, keep the batch
            im, valid[i] = torch.zeros(3, augment.crop_size, augment.crop_size, dtype=torch.uint8), False
        images.append(crop(im).permute(1, 2, 0).numpy())
    return {"key": np.asarray(rows["__key__"]), "epoch": np.asarray(rows["epoch"]), "valid": valid,
            "label": np.array([int(c) for c in rows["cls"]], dtype=np.int64), "image": np.stack(images),
            "teacher_pid": np.zeros(n, dtype=np.int64)}


class DeepAugmentWorker:
    """Actor: one perturbed copy of the autoencoder per ``images_per_copy`` images (robust.deepaugment)."""

    def __init__(self, state: dict[str, torch.Tensor], cfg: TeacherTrainConfig, seed: int) -> None:
        self.cfg = cfg.deepaugment
        self.net = build_autoencoder(dataclasses.replace(self.cfg, checkpoint=None)).eval()
        self.net.load_state_dict(state)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(batch["image"])).permute(0, 3, 1, 2)
        with torch.no_grad():
            out = deepaugment(x, self.net, self.cfg, generator=self.generator)
        return {**batch, "image": out.permute(0, 2, 3, 1).numpy()}



def write_deepaugment(cfg: RobustTeacherRecipeConfig, out_dir: Path) -> int:
    """DeepAugment copies of the training set, generated once by the teacher pool and written as shards."""
    fit = read_raw(cfg.data.train_shards, shuffle=False).map_batches(decode_crops, fn_kwargs={"augment": cfg.augment})
    x_fit = fit.take_batch(cfg.run.deepaugment_fit_images)["image"]
    net = autoencoder_for(torch.from_numpy(np.array(x_fit)).permute(0, 3, 1, 2), cfg.train.deepaugment)
    pool = cfg.pools.teacher
    stream = read_raw(cfg.data.train_shards, seed=cfg.run.seed).map_batches(
        decode_crops, fn_kwargs={"augment": cfg.augment}).map_batches(
        DeepAugmentWorker, fn_constructor_args=(net.state_dict(), cfg.train, cfg.run.seed),
        batch_size=cfg.train.deepaugment.images_per_copy * 4,
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor, resources={TEACHER_RESOURCE: 1})

    def samples():
        with tqdm(total=count_samples(cfg.data.train_shards), desc="DeepAugment", unit="img") as bar:
            for b in stream.iter_batches(batch_size=None):
                for i in np.flatnonzero(b["valid"]):
                    yield make_sample(f"da-{b['key'][i]}", encode_png(b["image"][i], compress_level=1), int(b["label"][i]))
                bar.update(len(b["key"]))

    return write_shards(samples(), out_dir, prefix="deepaugment", num_classes=cfg.train.model.num_classes,
                        overwrite=True).total


def run(cfg: RobustTeacherRecipeConfig) -> dict:
    check_config(cfg)
    out = run_dir(cfg)
    begin_run(cfg, out, cfg.pools)
    t0 = time.perf_counter()
    sources = [cfg.data.train_shards]
    if "deepaugment" in cfg.train.augmentations:
        da_dir = out / "deepaugment"
        if not (da_dir / "manifest.json").is_file():  # generated once, reused by a resumed run
            n = write_deepaugment(cfg, da_dir)
            (out / "deepaugment_generation.json").write_text(json.dumps({"samples": n, "seconds": time.perf_counter() - t0}))
        sources.append(str(da_dir))
    total = sum(count_samples(s) for s in sources)
    world = cfg.pools.student.num_workers
    steps = total // (world * cfg.optim.micro_batch_size * cfg.optim.grad_accum)
    if steps < 1:
        raise ValueError("fewer training samples than one global batch: lower optim.micro_batch_size")
    resume = ResumePoint.remote()
    stream = read_raw(sources, epochs=cfg.run.epochs, seed=cfg.run.seed, resume=resume).map_batches(
        decode_crops, fn_kwargs={"augment": cfg.augment})
    job = StudentJob(task=RobustTeacherTask(cfg.train, seed=cfg.run.seed), optim=cfg.optim, epochs=cfg.run.epochs,
                     steps_per_epoch=steps, run_dir=str(out), checkpoint_every=cfg.run.checkpoint_every,
                     log_every=cfg.run.log_every, resume=resume, export_stem="teacher")
    fit_students(job, stream, cfg.pools.student, name=cfg.run.name, storage_path=cfg.run.storage_path or str(out / "ray"),
                 max_failures=cfg.run.max_failures, execution=execution_options(cfg.data.max_in_flight_mb * 2**20))
    costs = {"teacher": time.perf_counter() - t0}
    if not cfg.data.test_shards:
        return {"models": {}}
    return evaluate_models({"teacher": out}, cfg.data.test_shards, cfg.eval, pools=cfg.pools.teacher, out_dir=out,
                           costs_s=costs)
