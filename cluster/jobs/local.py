"""What every job's ``preset=local`` shares: the digits at 32 px on one CPU machine, one teacher actor and
two student workers (one CPU each) on a local Ray cluster of 4 logical CPUs (the pools and the read tasks)."""

from __future__ import annotations

DIGITS_CROP: dict = {"crop_size": 32, "scale": [0.7, 1.0], "ratio": [0.9, 1.1], "hflip": 0.0,
                     "interpolation": "bilinear", "color_jitter": 0.0}
TEACHER_POOL: dict = {"min_actors": 1, "max_actors": 1, "gpus_per_actor": 0, "cpus_per_actor": 1, "batch_size": 64}
STUDENT_POOL: dict = {"num_workers": 2, "gpus_per_worker": 0, "cpus_per_worker": 1}
RAY: dict = {"num_cpus": 4, "object_store_mb": 512}
POOLS: dict = {"teacher": TEACHER_POOL, "student": STUDENT_POOL}
