"""RPT's teacher pool: per batch the student's crop, one augmented view of it, the frozen initial
model's logits on the crop (eq. 3's teacher) and the small robust teacher's logits on the view (eq. 4's),
optionally the frozen backbone M_b's features of both (the feature cache, written once as shards).

Same shape as the DAD teacher pool (``cluster.teacher_pool``): a Ray Data actor pool on the "teacher"
resource that builds its models once per run and emits uint8 images and fp16 logits.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image
from tqdm import tqdm

from cluster.config import TEACHER_RESOURCE, TeacherPoolConfig
from cluster.pipeline import read_raw
from cluster.student_tasks import images
from cluster.teacher_pool import AugmentConfig, crop_transform, to_uint8_BHWC
from robust.augment import AugMixConfig, augmix_transform
from robust.data.shards import AUG_FEATS, AUG_LOGITS, FEATS, LOGITS, decode_image, write_shards
from robust.models.timm_models import TimmConfig, build_timm
from robust.rpt.baselines import build_method
from robust.rpt.partial import PartialConfig


@dataclass
class RptTeacherJob:
    initial: TimmConfig  # the large model before tuning (checkpoint set): teacher of clean samples
    robust: TimmConfig  # the small robust teacher: teacher of augmented samples
    augment: AugmentConfig  # the crop the student sees
    augmix: AugMixConfig  # the augmented view ("unclean" samples)
    features: PartialConfig | None = None  # set: also emit M_b's features of both views (feature cache)
    method: str = "rpt"  # whose split defines M_b when features are emitted


class RptTeacherWorker:
    def __init__(self, job: RptTeacherJob) -> None:
        self.job = job
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.crop = crop_transform(job.augment)
        self.augmix = augmix_transform(job.augmix)
        self.initial = build_timm(job.initial).to(self.device).requires_grad_(False).eval()
        self.robust = build_timm(job.robust).to(self.device).requires_grad_(False).eval()
        self.backbone = (build_method(job.method, job.features).backbone.to(self.device)
                         if job.features is not None else None)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        valid = np.ones(len(rows["__key__"]), dtype=bool)
        crops = []
        for i, data in enumerate(rows["png" if "png" in rows else "jpg"]):
            try:
                im = torch.from_numpy(decode_image(data).copy()).permute(2, 0, 1)
            except Exception:  # noqa: BLE001 - undecodable bytes: skip the sample, keep the batch
                im, valid[i] = torch.zeros(3, self.job.augment.crop_size, self.job.augment.crop_size, dtype=torch.uint8), False
            crops.append(self.crop(im))
        image = to_uint8_BHWC(torch.stack(crops).float().div_(255))
        aug = np.stack([np.asarray(self.augmix(Image.fromarray(im))) for im in image])
        x, x_aug = images(image, self.device), images(aug, self.device)
        out = {"key": np.asarray(rows["__key__"]), "epoch": np.asarray(rows["epoch"]), "valid": valid,
               "label": np.array([int(c) for c in rows["cls"]], dtype=np.int64), "image": image, "aug_image": aug,
               "teacher_pid": np.full(len(valid), os.getpid())}
        with torch.no_grad():
            out["init_logits"] = self.initial(x).half().cpu().numpy()
            out["robust_logits"] = self.robust(x_aug).half().cpu().numpy()
            if self.backbone is not None:
                out["feats"] = self.backbone(x).cpu().numpy()
                out["aug_feats"] = self.backbone(x_aug).cpu().numpy()
        return out


def rpt_stream(raw: ray.data.Dataset, job: RptTeacherJob, pool: TeacherPoolConfig) -> ray.data.Dataset:
    return raw.map_batches(
        RptTeacherWorker, fn_constructor_kwargs={"job": job}, batch_size=pool.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor, resources={TEACHER_RESOURCE: 1})


def write_feature_cache(source: str, job: RptTeacherJob, pool: TeacherPoolConfig, out_dir: Path, *,
                        total: int, num_classes: int, seed: int) -> int:
    """Run the pool once over ``source`` and write M_b's features and both teachers' logits as shards."""
    assert job.features is not None

    def samples():
        stream = rpt_stream(read_raw(source, seed=seed), job, pool)
        with tqdm(total=total, desc="feature cache", unit="img") as bar:
            for b in stream.iter_batches(batch_size=None):
                for i in np.flatnonzero(b["valid"]):
                    yield {"__key__": str(b["key"][i]), "cls": int(b["label"][i]), FEATS: b["feats"][i],
                           AUG_FEATS: b["aug_feats"][i], LOGITS: b["init_logits"][i].astype(np.float16),
                           AUG_LOGITS: b["robust_logits"][i].astype(np.float16)}
                bar.update(len(b["key"]))

    return write_shards(samples(), out_dir, prefix="feats", num_classes=num_classes, overwrite=True).total


def decode_feature_cache(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data task: feature-cache shard rows -> the RPT pool's batch format (no images)."""

    def arrays(name: str) -> np.ndarray:
        return np.stack([np.load(io.BytesIO(b), allow_pickle=False) for b in rows[name]])

    n = len(rows["__key__"])
    return {"key": np.asarray(rows["__key__"]), "epoch": np.asarray(rows["epoch"]), "valid": np.ones(n, dtype=bool),
            "label": np.array([int(c) for c in rows["cls"]], dtype=np.int64), "feats": arrays(FEATS),
            "aug_feats": arrays(AUG_FEATS), "init_logits": arrays(LOGITS), "robust_logits": arrays(AUG_LOGITS),
            "teacher_pid": np.zeros(n, dtype=np.int64)}
