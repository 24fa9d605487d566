"""The teacher pool: an autoscaling Ray Data actor pool on the "teacher" resource (and a GPU each where
there is one) that runs a job's producer on every prepared batch.

A producer is the job's GPU work as a pure function of (batch, models): ``build`` makes its frozen
models once per actor (never per epoch: all epochs are one stream), ``produce`` adds columns to a batch
(teacher logits, DAD samples, features). The actors receive uint8 batches that the read tasks already
decoded and augmented, so they do only model work. A dead actor is restarted and Ray Data redoes its
in-flight batches; since randomness comes from the rows' seeds, a redone batch is the same batch.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import ray
import torch

from cluster.engine import batch as B
from cluster.engine.pools import TEACHER_RESOURCE, ActorPoolConfig, TeacherPoolConfig
from robust.seeding import seed_everything


class Producer(Protocol):
    def build(self, device: torch.device) -> Any:
        """The frozen models, on ``device``."""

    def produce(self, models: Any, batch: dict[str, np.ndarray], *, device: torch.device) -> dict[str, Any]:
        """New columns for ``batch`` (arrays or tensors; ``batch.build`` casts them)."""


def actor_device() -> torch.device:
    """The GPU Ray gave this actor (pools.teacher.gpus_per_actor), never one it merely sees."""
    return torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")


class TeacherActor:
    """The Ray Data actor: the producer's models, built once; one batch per call."""

    def __init__(self, producer: Producer) -> None:
        self.producer, self.device = producer, actor_device()
        seed_everything(0)  # a model built without weights (random init) is the same in every actor
        self.models = producer.build(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return B.build({**batch, **self.producer.produce(self.models, batch, device=self.device)})


def pool_map(ds: ray.data.Dataset, actor: type, pool: ActorPoolConfig, *, batch_size: int,
             **constructor_kwargs: Any) -> ray.data.Dataset:
    """``ds`` mapped by ``actor(**constructor_kwargs)`` on the autoscaling teacher actor pool (min..max)."""
    return ds.map_batches(
        actor, fn_constructor_kwargs=constructor_kwargs, batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor, resources={TEACHER_RESOURCE: 1})


def through_pool(ds: ray.data.Dataset, producer: Producer, pool: TeacherPoolConfig) -> ray.data.Dataset:
    """``ds`` mapped by ``producer`` on the teacher pool, ``pool.batch_size`` rows per call."""
    return pool_map(ds, TeacherActor, pool, batch_size=pool.batch_size, producer=producer)

