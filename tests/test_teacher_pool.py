"""The teacher pool on a real local Ray cluster: batch contents, and exactly-once under actor death."""

from __future__ import annotations

import os
import signal

import numpy as np
import timm
import torch
from safetensors.torch import save_file

from cluster.config import TeacherPoolConfig
from cluster.pipeline import read_raw
from cluster.teacher_pool import AugmentConfig, TeacherConfig, TeacherJob, build_teacher, teacher_stream
from robust.attacks.dad import DADConfig
from robust.models.timm_models import TimmConfig
from robust.models.vqgan import VQGAN_PRESETS, VQGANConfig

TEACHER = TeacherConfig(kind="timm", timm=TimmConfig(name="test_resnet", num_classes=10))
TINY_VQ = VQGANConfig(**{**VQGAN_PRESETS["digits32_f4_128"], "n_embed": 16})


def _job(mode: str) -> TeacherJob:
    return TeacherJob(mode=mode, teacher=TEACHER, vqgan=TINY_VQ, dad=DADConfig(eps=1.0, alpha=1.0),
                      augment=AugmentConfig(crop_size=32, scale=[0.7, 1.0], hflip=False))


def _pool(n: int, batch: int) -> TeacherPoolConfig:
    return TeacherPoolConfig(min_actors=n, max_actors=n, gpus_per_actor=0, cpus_per_actor=1, batch_size=batch)


def test_dad_batches_hold_what_the_student_needs(ray_local, small_shards, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "teacher.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), weights)
    job = _job("dad")
    job.teacher = TeacherConfig(kind="timm", timm=TimmConfig(name="test_resnet", num_classes=10, checkpoint=str(weights)))
    stream = teacher_stream(read_raw(str(small_shards["train"]), shuffle=False), job, _pool(1, 32))
    batch = next(iter(stream.iter_batches(batch_size=None)))
    b = len(batch["key"])
    assert batch["image"].shape == (b, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["dad_image"].shape == (b, 32, 32, 3) and batch["dad_image"].dtype == np.uint8
    assert batch["teacher_logits"].dtype == np.float16 and batch["teacher_logits"].shape == (b, 10)
    assert np.abs(batch["dad_image"].astype(int) - batch["image"].astype(int)).mean() > 1  # Q + attack moved it
    # The teacher scored exactly the uint8 pixels the student will see, clean and DAD.
    teacher = build_teacher(job.teacher, device=torch.device("cpu"))
    for image, logits in (("image", "teacher_logits"), ("dad_image", "dad_teacher_logits")):
        x = torch.from_numpy(np.array(batch[image])).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            expected = teacher(x)
        torch.testing.assert_close(torch.from_numpy(np.array(batch[logits])).float(), expected, atol=2e-2, rtol=1e-2)


def test_killed_teacher_actor_loses_and_duplicates_nothing(ray_local, small_shards):
    # One read task per shard: 25 shards give 25 DAD tasks, of which an actor holds at most 2 in flight
    # (Ray Data's default), so the kill at the first output leaves work in flight and work not started.
    stream = teacher_stream(read_raw(str(small_shards["train_fine"]), shuffle=False), _job("dad"), _pool(2, 8))
    keys, pids_after_kill, killed = [], set(), None
    for batch in stream.iter_batches(batch_size=None):
        keys += batch["key"].tolist()
        if killed is None:  # an actor dies mid-epoch, with batches in flight
            killed = int(batch["teacher_pid"][0])
            os.kill(killed, signal.SIGKILL)
        else:
            pids_after_kill |= set(batch["teacher_pid"].tolist())
    assert len(keys) == len(set(keys)), "a sample was delivered twice"
    assert sorted(keys) == sorted(small_shards["keys"]), "a sample was lost"
    assert pids_after_kill - {killed}, "no batch came from a surviving or restarted actor after the kill"
