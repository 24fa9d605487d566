"""The Ray cluster a job runs on: join the one ``ray job submit`` gives, or start a local one, and check that
it can hold the pools before any actor or worker starts."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import ray

from cluster.engine.pools import STUDENT_RESOURCE, TEACHER_RESOURCE, ActorPoolConfig, PoolsConfig

READ_TASK_CPUS = 1.0  # Ray Data's default per task: shard reads with their decode and augmentation


@dataclass
class RayConfig:
    address: str = ""  # "": the cluster in RAY_ADDRESS (set by `ray job submit`), else a new local one
    num_cpus: int = 0  # a new local cluster only; 0: Ray's default (the machine's cores)
    object_store_mb: int = 0
    check_resources: bool = True  # fail early when the pools ask for more than the cluster has
    log_level: str = "WARNING"  # of Ray's own loggers (Ray Train's checkpoint reports, Ray Data's plans) in the job


def actor_pool_needs(pool: ActorPoolConfig) -> dict[str, float]:
    """What an actor pool job (evaluation) holds at once: its smallest pool and one task to feed it."""
    return {TEACHER_RESOURCE: pool.min_actors, "CPU": pool.min_actors * pool.cpus_per_actor + READ_TASK_CPUS,
            "GPU": pool.min_actors * pool.gpus_per_actor}


def training_needs(pools: PoolsConfig, *, teacher_pool: bool) -> dict[str, float]:
    """What a training run holds at once: the teacher actors (when it has a teacher pool), the student
    workers, and at least one read task (its CPU cannot be taken by the pools, or the stream never starts)."""
    t, s = pools.teacher, pools.student
    actors = actor_pool_needs(t) if teacher_pool else {"CPU": READ_TASK_CPUS}
    return {STUDENT_RESOURCE: s.num_workers, TEACHER_RESOURCE: actors.get(TEACHER_RESOURCE, 0),
            "CPU": actors["CPU"] + s.num_workers * s.cpus_per_worker,
            "GPU": actors.get("GPU", 0) + s.num_workers * s.gpus_per_worker}


def check_resources(need: dict[str, float]) -> None:
    """An impossible pool size fails here, naming what is short and the ``ray start`` flags that would fit."""
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if v > have.get(k, 0)}
    if not short:
        return
    detail = ", ".join(f"{k}: need {v:g}, cluster has {h:g}" for k, (v, h) in short.items())
    custom = {k: max(int(need.get(k, 0)), int(have.get(k, 0)), 1) for k in (TEACHER_RESOURCE, STUDENT_RESOURCE)}
    cpus = max(need["CPU"], have.get("CPU", 0))
    flags = f"ray start --head --num-cpus={cpus:g} --resources='{json.dumps(custom)}'"
    raise ValueError(f"the pools ask for more than the cluster has ({detail}). Add nodes with those resources, "
                     f"start the cluster with `{flags}` (logical CPUs may exceed the cores), or lower "
                     "pools.teacher.min_actors / pools.student.num_workers / pools.*.cpus_per_*")


def start_ray(cfg: RayConfig, *, resources: dict[str, float]) -> None:
    """Join the cluster of ``cfg.address`` / RAY_ADDRESS, or start a local one with the pools'
    custom ``resources`` ({"teacher": n, "student": m})."""
    if ray.is_initialized():
        return
    # An explicit address, or RAY_ADDRESS (which `ray job submit` sets for its driver): join that cluster.
    # Never "auto": it would join whatever cluster this machine started last.
    quiet = ray.LoggingConfig(log_level=cfg.log_level)
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.address or None, logging_config=quiet)
        return
    # The dashboard hosts the state API that Ray Train's placement-group cleaner and the trainer's
    # teacher-pool gauge query.
    ray.init(address="local", num_cpus=cfg.num_cpus or None, object_store_memory=cfg.object_store_mb * 2**20 or None,
             resources=resources, include_dashboard=True, logging_config=quiet)
