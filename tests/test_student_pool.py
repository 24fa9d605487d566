"""The student pool: 2 DeepSpeed ZeRO workers under Ray Train on the CPU, fed by the teacher pool."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from cluster.config import StudentPoolConfig, TeacherPoolConfig
from cluster.deepspeed_config import OptimConfig
from cluster.pipeline import ResumePoint, execution_options, read_raw
from cluster.student_pool import StudentJob, fit_students
from cluster.student_tasks import DistillTask
from cluster.teacher_pool import AugmentConfig, TeacherConfig, TeacherJob, teacher_stream
from robust.attacks.dad import DADConfig
from robust.losses.objectives import ObjectiveConfig
from robust.models.timm_models import TimmConfig
from robust.models.vqgan import VQGANConfig
from tests.conftest import N_SMALL

STUDENT = TimmConfig(name="test_resnet", num_classes=10)


@pytest.mark.parametrize("zero_stage", [2])
def test_worker_failure_resumes_from_checkpoint(ray_local, small_shards, tmp_path, zero_stage):
    micro, world, epochs = 16, 2, 2
    steps = (N_SMALL + 1) // (world * micro)  # 6 per epoch; the corrupt sample is in the stream
    job = StudentJob(task=DistillTask(STUDENT, ObjectiveConfig(kind="ce")),
                     optim=OptimConfig(zero_stage=zero_stage, micro_batch_size=micro, warmup_steps=2),
                     epochs=epochs, steps_per_epoch=steps,
                     run_dir=str(tmp_path / "run"), checkpoint_every=4, log_every=1, fail_at_step=5, record_ids=True,
                     resume=(resume := ResumePoint.remote()))
    teacher = TeacherJob(mode="ce", teacher=TeacherConfig(), vqgan=VQGANConfig(), dad=DADConfig(),
                         augment=AugmentConfig(crop_size=32, scale=[0.7, 1.0], hflip=False))
    pool = TeacherPoolConfig(min_actors=1, max_actors=1, gpus_per_actor=0, cpus_per_actor=1, batch_size=micro)
    stream = teacher_stream(read_raw(str(small_shards["train"]), epochs=epochs, resume=resume), teacher, pool)
    students = StudentPoolConfig(num_workers=world, gpus_per_worker=0, cpus_per_worker=1, nice=5)
    result = fit_students(job, stream, students, name="resume", storage_path=str(tmp_path / "ray"),
                          execution=execution_options(64 * 2**20), max_failures=2)
    assert (tmp_path / "run" / ".failed_once").exists()  # the injected failure happened
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in rows]
    # The failure at step 5 (before it was logged) resumes from the checkpoint at step 4, mid-epoch:
    # the step count continues (1..4 are never redone) and the epoch still ends after its 6 steps.
    assert logged == list(range(1, epochs * steps + 1))
    assert result.metrics["step"] == epochs * steps
    assert sum(r["corrupt_skipped"] for r in rows if r["epoch"] == 1) == 1  # counted once per epoch
    # After the failure, one teacher actor serves the rest of epoch 0 and all of epoch 1, each sample of
    # epoch 1 once: all epochs are one stream, so the teacher is built once per execution, never per epoch.
    seen = [line.split() for f in sorted((tmp_path / "run").glob("seen_ids.rank*.txt")) for line in f.read_text().splitlines()]
    after = seen[-1][2]
    assert {pid for e, _, pid in seen if e == "1"} - {pid for e, _, pid in seen if e == "0"} == set()
    assert len({pid for e, _, pid in seen if e == "0"}) == 2  # the actor before the failure and the one after
    epoch1 = [key for e, key, pid in seen if e == "1" and pid == after]
    assert len(epoch1) == len(set(epoch1)) >= N_SMALL - world * micro
    # The export rebuilds with plain timm.
    model = timm.create_model("test_resnet", num_classes=10)
    model.load_state_dict(load_file(tmp_path / "run" / "student.safetensors"))
    assert json.loads((tmp_path / "run" / "student.json").read_text())["num_classes"] == 10
    assert torch.isfinite(model(torch.rand(2, 3, 32, 32))).all()
