"""The Ray cluster a recipe runs on, and the data every recipe streams: shared by all recipes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ray

from cluster.config import STUDENT_RESOURCE, TEACHER_RESOURCE, PoolsConfig
from robust.config import save_config


@dataclass
class DataConfig:
    train_shards: str = ""  # shard dir with manifest.json (robust-distill data convert), on a path every node sees
    test_shards: str = ""  # evaluated clean and under the corruption suite
    max_in_flight_mb: int = 1024  # object-store bytes the teacher pool may run ahead of the students


@dataclass
class RayInitConfig:
    address: str = ""  # "": the cluster in RAY_ADDRESS (set by `ray job submit`), else a new local one
    num_cpus: int = 0  # a new local cluster only; 0: Ray's default
    object_store_mb: int = 0
    check_resources: bool = True  # fail early when the pools ask for more than the cluster has


def check_resources(pools: PoolsConfig) -> None:
    """An impossible pool size fails here, before any actor or worker starts."""
    have = ray.cluster_resources()
    need = {TEACHER_RESOURCE: pools.teacher.min_actors, STUDENT_RESOURCE: pools.student.num_workers,
            "GPU": pools.teacher.min_actors * pools.teacher.gpus_per_actor
            + pools.student.num_workers * pools.student.gpus_per_worker}
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if v > have.get(k, 0)}
    if short:
        detail = ", ".join(f"{k}: need {v:g}, cluster has {h:g}" for k, (v, h) in short.items())
        raise ValueError(f"the pools ask for more than the cluster has ({detail}); lower pools.teacher.min_actors "
                         "/ pools.student.num_workers or add nodes with those resources")


def start_ray(cfg: RayInitConfig, pools: PoolsConfig) -> None:
    if ray.is_initialized():
        return
    # An explicit address, or RAY_ADDRESS (which `ray job submit` sets for its driver): join that cluster.
    # Never "auto": it would join whatever cluster this machine started last.
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.address or None)
        return
    # The dashboard hosts the state API that Ray Train's placement-group cleaner polls.
    ray.init(address="local", num_cpus=cfg.num_cpus or None, object_store_memory=cfg.object_store_mb * 2**20 or None,
             resources={TEACHER_RESOURCE: pools.teacher.max_actors, STUDENT_RESOURCE: pools.student.num_workers},
             include_dashboard=True)


def begin_run(cfg, out: Path, pools: PoolsConfig) -> None:
    """What every recipe does before its work: the run directory with the resolved config, Ray, and the
    resource check (``cfg`` has ``ray``; an impossible pool size fails here)."""
    if not 0 <= pools.student.nice <= 19:
        raise ValueError(f"pools.student.nice must be an os.nice increment in 0..19, got {pools.student.nice}")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    start_ray(cfg.ray, pools)
    # Progress comes from the workers' step lines and the evaluation bar, not Ray Data's operator bars.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if cfg.ray.check_resources:
        check_resources(pools)


def print_summary(report: dict) -> None:
    for name, entry in report["models"].items():
        print(f"{name:>16}: clean {entry['clean_acc']:.1f}%  corrupted {entry.get('corrupt_acc', float('nan')):.1f}%")
