"""``preset=local`` of the robust-teacher job: a ``test_resnet`` on the built-in digits through the pools."""

from __future__ import annotations

from pathlib import Path

from cluster.jobs.local import DIGITS_CROP, POOLS, RAY
from cluster.jobs.robust_teacher import RobustTeacherJobConfig
from robust.config import Preset
from robust.data.digits import build_digits_shards

OVERLAY: dict = {
    "data": {"max_in_flight_mb": 64},
    "train": {"model": {"name": "test_resnet", "num_classes": 10}},
    "deepaugment_fit_images": 1347,
    "augment": DIGITS_CROP,
    "optim": {"zero_stage": 2, "micro_batch_size": 64, "lr": 3e-3, "weight_decay": 0.05, "warmup_epochs": 0.5},
    "pools": POOLS,
    "run": {"name": "robust-teacher-local", "epochs": 6, "checkpoint_every": 50, "log_every": 10},
    "ray": RAY,
}


def prepare(cfg: RobustTeacherJobConfig) -> None:
    """Point ``cfg`` at the digits shards (built once under ``<run.out_dir>/cache``)."""
    dirs = build_digits_shards(Path(cfg.run.out_dir).expanduser().resolve() / "cache" / "digits")
    cfg.data.train_shards, cfg.data.test_shards = str(dirs["train"]), str(dirs["test"])


LOCAL = Preset(OVERLAY, prepare=prepare)
