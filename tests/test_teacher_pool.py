"""The teacher pool on a real Ray cluster: what a DAD batch holds (timm and CLIP teachers), exactly-once
delivery when an actor process is killed from outside, and producers that draw from the batch only."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import ray
import timm
import torch
from ray.util.state import list_actors
from safetensors.torch import save_file

from cluster.engine import batch as B
from cluster.engine.pools import TeacherPoolConfig
from cluster.engine.prepare import Augment
from cluster.engine.streams import bounded, execution_options, sample_stream
from cluster.engine.teacher_pool import through_pool
from cluster.jobs.dad import DistillProducer
from cluster.engine.deepaugment import DeepAugmentProducer
from robust.attacks.dad import DADConfig
from robust.deepaugment import DeepAugConfig, build_autoencoder
from robust.distill import TeacherConfig, build_teacher
from robust.models.clip_teacher import ClipTeacherConfig
from robust.models.timm_models import TimmConfig
from robust.models.vqgan import VQGAN_PRESETS, VQGANConfig
from robust.train_transforms import TrainAugConfig

TINY_VQ = VQGANConfig(**{**VQGAN_PRESETS["digits32_f4_128"], "n_embed": 16})
CROP = TrainAugConfig(crop_size=32, scale=[0.7, 1.0], ratio=[0.9, 1.1], hflip=0.0, interpolation="bilinear",
                      auto_augment="", color_jitter=0.0, re_prob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0)
DAD = DADConfig(eps=1.0, alpha=1.0)


def _pool(n: int, batch: int) -> TeacherPoolConfig:
    return TeacherPoolConfig(min_actors=n, max_actors=n, gpus_per_actor=0, cpus_per_actor=1, batch_size=batch)


def _stream(source, producer, *, actors: int = 1, batch: int = 32, aug: TrainAugConfig = CROP):
    return through_pool(sample_stream(str(source), Augment(aug, 10), epochs=1, seed=0, batch_size=batch,
                                      num_classes=10, shuffle=False), producer, _pool(actors, batch))


def _check_dad_batch(batch: dict, teacher: TeacherConfig, classes: int) -> None:
    B.validate(batch, needs=[B.IMAGE, B.TEACHER_LOGITS, B.DAD_IMAGE, B.DAD_TEACHER_LOGITS])
    n = len(batch[B.KEY])
    assert batch[B.TEACHER_LOGITS].shape == (n, classes)
    assert np.abs(batch[B.DAD_IMAGE].astype(int) - batch[B.IMAGE].astype(int)).mean() > 1  # Q + attack moved it
    # The teacher scored exactly the uint8 pixels the student will see, clean and DAD.
    model = build_teacher(teacher, device=torch.device("cpu"))
    for image, logits in ((B.IMAGE, B.TEACHER_LOGITS), (B.DAD_IMAGE, B.DAD_TEACHER_LOGITS)):
        with torch.no_grad():
            expected = model(B.images(batch[image], "cpu"))
        torch.testing.assert_close(torch.from_numpy(batch[logits]).float(), expected, atol=2e-2, rtol=1e-2)


MIXED = TrainAugConfig(crop_size=32, scale=[0.7, 1.0], ratio=[0.9, 1.1], hflip=0.5, interpolation="bilinear",
                       auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, mixup=0.8, cutmix=1.0, label_smoothing=0.1)


def test_dad_batches_of_mixed_images_hold_what_the_students_need(ray_cluster, small_shards, tmp_path):
    # the paper's recipe: RandAugment, erasing, mixup / CutMix with label smoothing, in the read tasks
    torch.manual_seed(0)
    weights = tmp_path / "teacher.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), weights)
    teacher = TeacherConfig(kind="timm", timm=TimmConfig(name="test_resnet", num_classes=10, checkpoint=str(weights)))
    stream = _stream(small_shards["train"], DistillProducer(teacher, TINY_VQ, DAD), aug=MIXED)
    batches = list(stream.iter_batches(batch_size=None))
    _check_dad_batch(batches[0], teacher, 10)  # the teacher scored the mixed pixels themselves
    target = np.concatenate([b[B.TARGET][b[B.VALID]] for b in batches])
    np.testing.assert_allclose(target.sum(axis=1), 1.0, rtol=1e-5)  # soft labels: distributions
    assert target.max() <= 0.9 + 0.1 / 10 + 1e-6  # label smoothing 0.1
    assert (np.sort(target, axis=1)[:, -2] > 0.05).mean() > 0.3  # mixed: a second class holds mass
    # the same seed makes the same batches again: crops, mixing, DAD random starts, teacher logits
    again = list(_stream(small_shards["train"], DistillProducer(teacher, TINY_VQ, DAD), aug=MIXED).iter_batches(batch_size=None))
    for a, b in zip(batches, again):
        for column in (B.KEY, B.IMAGE, B.TARGET, B.DAD_IMAGE, B.TEACHER_LOGITS):
            np.testing.assert_array_equal(a[column], b[column])
    # and another method (CE: no teacher pool) trains on exactly these pixels
    ce = sample_stream(str(small_shards["train"]), Augment(MIXED, 10), epochs=1, seed=0, batch_size=32, num_classes=10,
                       shuffle=False)
    first = next(iter(ce.iter_batches(batch_size=None)))
    np.testing.assert_array_equal(first[B.KEY], batches[0][B.KEY])
    np.testing.assert_array_equal(first[B.IMAGE], batches[0][B.IMAGE])


def test_the_clip_teacher_serves_dad_batches(ray_cluster, small_shards, tiny_clip, tmp_path):
    clip = ClipTeacherConfig(arch=tiny_clip, pretrained="", class_names=[f"digit {i}" for i in range(10)],
                             templates=["a photo of the number {}."], cache_dir=str(tmp_path / "clip"))
    teacher = TeacherConfig(kind="clip", clip=clip)
    batch = next(iter(_stream(small_shards["train"], DistillProducer(teacher, TINY_VQ, DAD)).iter_batches(batch_size=None)))
    _check_dad_batch(batch, teacher, 10)
    assert any(tmp_path.glob("clip/*.safetensors"))  # the actor cached the class embeddings


def _teacher_actor_pids() -> list[int]:
    gcs = ray.get_runtime_context().gcs_address
    actors = list_actors(address=gcs, filters=[("state", "=", "ALIVE")], detail=True, raise_on_missing_output=False)
    return [a.pid for a in actors if "teacher" in (a.required_resources or {}) and a.pid]


def _a_teacher_actor_pid() -> int:
    deadline = time.monotonic() + 20  # the state API reports a new actor a moment after it starts
    while not (pids := _teacher_actor_pids()):
        assert time.monotonic() < deadline, "no live teacher actor in Ray's state API"
        time.sleep(0.5)
    return pids[0]


def test_a_killed_teacher_actor_loses_and_duplicates_nothing(ray_cluster, small_shards):
    # 25 shards, 25 DAD tasks of 8: the kill at the first output leaves work in flight and work not started.
    teacher = TeacherConfig(kind="timm", timm=TimmConfig(name="test_resnet", num_classes=10))
    stream = _stream(small_shards["train_fine"], DistillProducer(teacher, TINY_VQ, DAD), actors=2, batch=8)
    # bounded as the students' stream is (about 4 batches in flight), so that the pool cannot have finished
    # every task by the first output the driver reads (unbounded, it sometimes had: no actor left to kill)
    limit = 4 * 8 * (2 * 32 * 32 * 3 + 2 * 10 * 2)
    stream = bounded(stream, limit)
    stream.context.execution_options = execution_options(limit, preserve_order=True)
    keys, killed = [], None
    for batch in stream.iter_batches(batch_size=None):
        keys += batch[B.KEY].tolist()
        if killed is None:  # an actor process dies from outside, with batches in flight
            killed = _a_teacher_actor_pid()
            os.kill(killed, signal.SIGKILL)
    assert killed is not None
    assert len(keys) == len(set(keys)), "a sample was delivered twice"
    assert sorted(keys) == sorted(small_shards["keys"]), "a sample was lost"
    deadline = time.monotonic() + 60  # the pool is back to two live actors, none of them the killed one
    while killed in _teacher_actor_pids() and time.monotonic() < deadline:
        time.sleep(1)
    assert killed not in _teacher_actor_pids()


def test_deepaugment_draws_its_networks_from_the_batch_not_the_actor():
    # Every DeepAugment actor used the same seed, so the first batch of every actor went through the same
    # perturbed networks. Now a batch's networks come from its samples' seeds: the same batch gives the
    # same copies whichever actor (or call order) makes it, and other batches other networks.
    cfg = DeepAugConfig(images_per_copy=4)
    producer = DeepAugmentProducer(build_autoencoder(cfg).state_dict(), cfg)
    x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)

    def batch(seeds):
        return {B.KEY: np.array([f"k{i}" for i in range(8)]), B.EPOCH: np.zeros(8, np.int64), B.IMAGE: x,
                B.SEED: np.asarray(seeds, np.int64)}

    first_actor, second_actor = producer.build("cpu"), producer.build("cpu")
    a = producer.produce(first_actor, batch(range(8)), device="cpu")[B.IMAGE]
    producer.produce(second_actor, batch(range(100, 108)), device="cpu")  # another batch first on this actor
    b = producer.produce(second_actor, batch(range(8)), device="cpu")[B.IMAGE]
    c = producer.produce(first_actor, batch(range(8, 16)), device="cpu")[B.IMAGE]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the same pixels, other seeds: other perturbed networks
    keys = producer.produce(first_actor, {**batch(range(8)), B.EPOCH: np.ones(8, np.int64)}, device="cpu")[B.KEY]
    assert keys[0] == "da1-k0"  # copy c of a sample is named by its epoch


@pytest.fixture(autouse=True)
def _cluster_whole(ray_cluster):
    yield
    ray_cluster.restore()
