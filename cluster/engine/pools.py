"""Typed configs of the two pools. Ray custom resources name the pools: "teacher" and "student"."""

from __future__ import annotations

from dataclasses import dataclass, field

TEACHER_RESOURCE = "teacher"
STUDENT_RESOURCE = "student"


@dataclass
class ActorPoolConfig:
    """A Ray Data actor pool on the "teacher" resource; autoscales in [min, max] actors."""

    min_actors: int = 1
    max_actors: int = 8
    gpus_per_actor: float = 1.0  # 0 on a CPU-only cluster
    cpus_per_actor: float = 4.0


@dataclass
class TeacherPoolConfig(ActorPoolConfig):
    """The pool that serves the frozen teachers and the VQGAN, a batch of the stream per call."""

    batch_size: int = 64


@dataclass
class StudentPoolConfig:
    """Ray Train workers that run DeepSpeed ZeRO; a fixed world size (ZeRO shards must not move)."""

    num_workers: int = 8
    gpus_per_worker: float = 1.0  # 0 on a CPU-only cluster
    cpus_per_worker: float = 8.0
    # os.nice increment of each worker (0-19). On a node the teacher pool shares, a positive value lets
    # the teacher, the slower stage on CPUs, take a core first; students then run in its gaps.
    nice: int = 0


@dataclass
class PoolsConfig:
    teacher: TeacherPoolConfig = field(default_factory=TeacherPoolConfig)
    student: StudentPoolConfig = field(default_factory=StudentPoolConfig)


def check_actor_pool(pool: ActorPoolConfig, *, key: str) -> None:
    if not 1 <= pool.min_actors <= pool.max_actors:
        raise ValueError(f"{key} needs 1 <= min_actors <= max_actors, got ({pool.min_actors}, {pool.max_actors})")
    if pool.gpus_per_actor < 0 or pool.cpus_per_actor < 0:
        raise ValueError(f"{key}.gpus_per_actor and {key}.cpus_per_actor must be >= 0")


def check_pools(pools: PoolsConfig) -> None:
    """Sizes that no cluster can run fail here, before Ray starts."""
    t, s = pools.teacher, pools.student
    check_actor_pool(t, key="pools.teacher")
    if t.batch_size < 1 or s.num_workers < 1:
        raise ValueError(f"pools.teacher.batch_size ({t.batch_size}) and pools.student.num_workers ({s.num_workers}) "
                         "must be >= 1")
    if s.gpus_per_worker < 0 or s.cpus_per_worker < 0:
        raise ValueError("pools.student.gpus_per_worker and pools.student.cpus_per_worker must be >= 0")
    if not 0 <= s.nice <= 19:
        raise ValueError(f"pools.student.nice must be an os.nice increment in 0..19, got {s.nice}")
