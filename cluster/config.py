"""Typed configs of the two pools. Ray custom resources name the pools: "teacher" and "student"."""

from __future__ import annotations

from dataclasses import dataclass, field

TEACHER_RESOURCE = "teacher"
STUDENT_RESOURCE = "student"


@dataclass
class TeacherPoolConfig:
    """Ray Data actor pool that serves the frozen teachers and the VQGAN; autoscales in [min, max]."""

    min_actors: int = 1
    max_actors: int = 8
    gpus_per_actor: float = 1.0  # 0 on a CPU-only cluster
    cpus_per_actor: float = 4.0
    batch_size: int = 64
    max_batches_in_flight: int = 4  # object-store backpressure: batches produced but not yet consumed


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
