"""``preset=local`` of the robust-teacher job: a ``test_resnet`` on the built-in digits through the pools."""

from __future__ import annotations

from pathlib import Path

from cluster.jobs.robust_teacher import RobustTeacherJobConfig
from robust.config import Preset
from robust.data.digits import build_digits_shards

OVERLAY: dict = {
    "data": {"max_in_flight_mb": 64},
    "train": {"model": {"name": "test_resnet", "num_classes": 10}},
    "deepaugment_fit_images": 1347,
    "augment": {"crop_size": 32, "scale": [0.7, 1.0], "ratio": [0.9, 1.1], "hflip": 0.0, "interpolation": "bilinear",
                "color_jitter": 0.0},
    "optim": {"zero_stage": 2, "micro_batch_size": 64, "lr": 3e-3, "weight_decay": 0.05, "warmup_epochs": 0.5},
    "pools": {
        "teacher": {"min_actors": 1, "max_actors": 1, "gpus_per_actor": 0, "cpus_per_actor": 1, "batch_size": 64},
        "student": {"num_workers": 2, "gpus_per_worker": 0, "cpus_per_worker": 1},
    },
    "run": {"name": "robust-teacher-local", "epochs": 6, "checkpoint_every": 50, "log_every": 10},
    "ray": {"num_cpus": 4, "object_store_mb": 512},
}


def prepare(cfg: RobustTeacherJobConfig) -> None:
    """Point ``cfg`` at the digits shards (built once under ``<run.out_dir>/cache``)."""
    dirs = build_digits_shards(Path(cfg.run.out_dir).expanduser().resolve() / "cache" / "digits")
    cfg.data.train_shards, cfg.data.test_shards = str(dirs["train"]), str(dirs["test"])


LOCAL = Preset(OVERLAY, prepare=prepare)
