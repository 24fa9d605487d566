"""Teacher pool: an autoscaling Ray Data actor pool that turns raw shard rows into training batches.

Per batch, on the "teacher" custom resource (and a GPU where there is one): decode, random resized
crop + flip (here, so the soft targets belong to the exact pixels the student sees), DAD samples
(attack on the teacher, VQGAN-discretized), and the teacher's logits for the clean and DAD images.
Output: uint8 images and fp16 logits. Ray Data streams the output through the object store with
bounded memory; a dead actor is restarted and its in-flight batches are redone by Ray Data.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import numpy as np
import ray
import torch
from torchvision.transforms import v2

from cluster.config import TEACHER_RESOURCE, TeacherPoolConfig
from robust.attacks.dad import DADConfig, dad_samples
from robust.data.shards import decode_image
from robust.models.clip_teacher import ClipTeacherConfig, build_clip_teacher
from robust.models.timm_models import TimmConfig, build_timm
from robust.models.vqgan import VQGANConfig, build_vqgan, discretize

MODES = ("ce", "kd", "dad")  # what the pool computes: crops only; + teacher logits; + DAD samples


@dataclass
class AugmentConfig:
    """The student's input augmentation, applied on the teacher pool (timm/torchvision RRC + flip)."""

    crop_size: int = 224
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: bool = True


@dataclass
class TeacherConfig:
    """The frozen teacher: CLIP zero-shot (open_clip) or any timm classifier."""

    kind: str = "clip"  # "clip" | "timm"
    clip: ClipTeacherConfig = field(default_factory=ClipTeacherConfig)
    timm: TimmConfig = field(default_factory=lambda: TimmConfig(name="resnet50", num_classes=1000))


@dataclass
class TeacherJob:
    mode: str
    teacher: TeacherConfig
    vqgan: VQGANConfig
    dad: DADConfig
    augment: AugmentConfig
    seed: int = 0


def build_teacher(cfg: TeacherConfig, *, device: torch.device) -> torch.nn.Module:
    if cfg.kind == "clip":
        return build_clip_teacher(cfg.clip, device=device)
    if cfg.kind == "timm":
        return build_timm(cfg.timm).to(device).requires_grad_(False).eval()
    raise ValueError(f"teacher.kind must be 'clip' or 'timm', got {cfg.kind!r}")


def crop_transform(cfg: AugmentConfig) -> v2.Transform:
    steps = [v2.RandomResizedCrop(cfg.crop_size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), antialias=True)]
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def to_uint8_BHWC(x_BCHW: torch.Tensor) -> np.ndarray:
    return x_BCHW.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class TeacherWorker:
    """The Ray Data actor: builds its models once (never per epoch) and maps raw rows to batches."""

    def __init__(self, job: TeacherJob) -> None:
        if job.mode not in MODES:
            raise ValueError(f"teacher pool mode must be one of {MODES}, got {job.mode!r}")
        self.job = job
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.augment = crop_transform(job.augment)
        self.generator = torch.Generator(self.device).manual_seed(job.seed * 100_003 + os.getpid())
        self.teacher = build_teacher(job.teacher, device=self.device) if job.mode != "ce" else None
        self.vqgan = build_vqgan(job.vqgan, device=self.device) if job.mode == "dad" else None

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, valid = self._decode(rows)
        x_BCHW = torch.stack([self.augment(torch.from_numpy(np.array(im)).permute(2, 0, 1)) for im in images])
        x_BCHW = x_BCHW.to(self.device).float().div_(255)
        labels = np.array([int(c) for c in rows["cls"]], dtype=np.int64)
        out = {"key": np.asarray(rows["__key__"]), "epoch": np.asarray(rows["epoch"]), "label": labels, "valid": valid,
               "image": to_uint8_BHWC(x_BCHW), "teacher_pid": np.full(len(labels), os.getpid())}
        if self.teacher is None:
            return out
        # The student sees the uint8 pixels: the teacher must score exactly those.
        x_BCHW = torch.from_numpy(out["image"]).to(self.device).permute(0, 3, 1, 2).float().div_(255)
        with torch.no_grad():
            out["teacher_logits"] = self.teacher(x_BCHW).half().cpu().numpy()
        if self.vqgan is not None:
            y = torch.from_numpy(labels).to(self.device)
            q = functools.partial(discretize, self.vqgan)
            x_dad = to_uint8_BHWC(dad_samples(self.teacher, q, x_BCHW, y, self.job.dad, generator=self.generator))
            with torch.no_grad():
                x_dad_BCHW = torch.from_numpy(x_dad).to(self.device).permute(0, 3, 1, 2).float().div_(255)
                out["dad_teacher_logits"] = self.teacher(x_dad_BCHW).half().cpu().numpy()
            out["dad_image"] = x_dad
        return out

    def _decode(self, rows: dict[str, np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        """Decode each row's image; a corrupt one becomes a black image with valid=False (counted downstream)."""
        n = len(rows["__key__"])
        encoded = [next((rows[k][i] for k in ("png", "jpg") if k in rows and rows[k][i] is not None), None)
                   for i in range(n)]
        images, valid = [], np.ones(n, dtype=bool)
        for i, data in enumerate(encoded):
            try:
                images.append(decode_image(data))
            except Exception:  # noqa: BLE001 - any undecodable bytes: skip the sample, keep the batch
                images.append(np.zeros((self.job.augment.crop_size,) * 2 + (3,), np.uint8))
                valid[i] = False
        return images, valid


def teacher_stream(raw: ray.data.Dataset, job: TeacherJob, pool: TeacherPoolConfig) -> ray.data.Dataset:
    """Map raw webdataset rows through the autoscaling teacher actor pool (min..max actors)."""
    if pool.min_actors < 1 or pool.max_actors < pool.min_actors:
        raise ValueError(f"teacher pool size must satisfy 1 <= min_actors <= max_actors, got "
                         f"({pool.min_actors}, {pool.max_actors})")
    return raw.map_batches(
        TeacherWorker,
        fn_constructor_kwargs={"job": job},
        batch_size=pool.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        num_cpus=pool.cpus_per_actor,
        num_gpus=pool.gpus_per_actor,
        resources={TEACHER_RESOURCE: 1},
    )
