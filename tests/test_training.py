"""The student pool on a real multi-node Ray cluster with real DeepSpeed on gloo: every ZeRO stage exports
what its engine trained, gradient accumulation is the same update, and a DAD pass (CE, KD and DAD students
together) that loses a student node resumes exactly where a run without the fault goes."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file

from cluster.engine.checkpoints import usable_checkpoints
from cluster.engine.deepspeed_config import OptimConfig
from cluster.engine.pools import PoolsConfig, StudentPoolConfig, TeacherPoolConfig
from cluster.engine.prepare import Augment
from cluster.engine.runner import DataConfig, RunConfig, train
from cluster.engine.streams import ResumePoint, count_samples, sample_stream
from cluster.engine.tasks import DistillTask
from cluster.engine.tracking import TENSORBOARD, LoggingConfig
from cluster.engine.trainer import CKPT_TAG
from cluster.jobs.dad import DadConfig, check, train_students
from robust.config import load_config
from robust.data.digits import digits_arrays
from robust.data.shards import encode_png, make_sample, write_shards
from robust.losses.objectives import ObjectiveConfig
from robust.models.timm_models import TimmConfig
from robust.train_transforms import TrainAugConfig

CROP = TrainAugConfig(crop_size=32, scale=[0.7, 1.0], ratio=[0.9, 1.1], hflip=0.0, interpolation="bilinear",
                      auto_augment="", color_jitter=0.0, re_prob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0)
VIT = TimmConfig(name="test_vit", num_classes=10, img_size=32)  # LayerNorm only: per-sample, like the loss
EVEN = 256  # 4 shards of 64 = 8 teacher batches of 32 per epoch: the two ranks get equal halves of every epoch


@pytest.fixture(scope="module")
def even_shards(tmp_path_factory) -> Path:
    x, y, _, _ = digits_arrays()
    out = tmp_path_factory.mktemp("even")
    write_shards((make_sample(f"e{i:04d}", encode_png(x[i]), int(y[i])) for i in range(EVEN)), out,
                 max_per_shard=64, num_classes=10)
    return out


def _latest_checkpoint(storage: Path) -> Path:
    return sorted(p for p in storage.glob("*/checkpoint_*") if p.is_dir())[-1]


def _export(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


EXPORTS: dict[int, dict[str, torch.Tensor]] = {}


@pytest.mark.parametrize("stage, micro, accum", [(0, 16, 1), (1, 8, 2), (2, 16, 1), (3, 8, 2)])
def test_each_zero_stage_exports_what_its_engine_trained(ray_cluster, even_shards, tmp_path, stage, micro, accum):
    run = RunConfig(name=f"zero{stage}", out_dir=str(tmp_path), epochs=1, checkpoint_every=100, log_every=100)
    pools = PoolsConfig(TeacherPoolConfig(batch_size=32), StudentPoolConfig(2, 0, 1))
    resume = ResumePoint.remote()
    stream = sample_stream(str(even_shards), Augment(CROP, 10), epochs=1, seed=0, batch_size=32, num_classes=10,
                           resume=resume)
    optim = OptimConfig(zero_stage=stage, micro_batch_size=micro, grad_accum=accum, lr=1e-3, warmup_epochs=0.5)
    trained = train({"ce": DistillTask(VIT, "ce", ObjectiveConfig())}, stream, tmp_path / "run", name=run.name, run=run,
                    seed=0, data=DataConfig(max_in_flight_mb=64), pools=pools, optim=optim, total=EVEN,
                    batch_bytes=32 * 32 * 32 * 3, resume=resume, logging=LoggingConfig(tensorboard=False))["ce"]
    exported = _export(trained.path)
    # the engine's own final state: DeepSpeed's checkpoint, consolidated by DeepSpeed (ZeRO-3 partitions too)
    ckpt = _latest_checkpoint(Path(run.out_dir) / run.name / "ray") / "ce"
    if stage == 0:
        engine = torch.load(ckpt / CKPT_TAG / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    else:
        engine = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=CKPT_TAG)
    engine = {k.removeprefix("model."): v for k, v in engine.items()}
    assert engine.keys() == exported.keys()
    assert all(torch.equal(exported[k], engine[k].float()) for k in engine)
    # plain timm rebuilds it with the engine's outputs
    rebuilt = timm.create_model(f"local-dir:{trained.path}", pretrained=True).eval()
    reference = timm.create_model("test_vit", num_classes=10, img_size=32).eval()
    reference.load_state_dict(engine)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), reference(x), rtol=0, atol=0)
    # every stage and micro-batching makes the same updates: 2 x 8 accumulated is 1 x 16 (fp32 noise)
    EXPORTS[stage] = exported
    if 0 in EXPORTS and stage != 0:
        first = EXPORTS[0]
        moved = max((first[k] - v).abs().max().item() for k, v in exported.items())
        assert moved < 1e-5, f"ZeRO-{stage} with {micro} x {accum} differs from ZeRO-0 with 16 x 1 by {moved}"


def _dad_cfg(shards: Path, out: Path, name: str) -> DadConfig:
    """CE, KD and DAD students of test_resnet in one pass; ZeRO-2, 2 micro-batches of 16 per step, EMA."""
    from tests.test_teacher_pool import TINY_VQ  # the small VQGAN of the teacher-pool tests

    cfg = load_config(DadConfig, overrides=[
        f"data.train_shards={shards}", f"data.test_shards={shards}", "data.max_in_flight_mb=8",
        f"run.out_dir={out}", f"run.name={name}", "run.methods=[ce,kd,dad]", "run.epochs=2", "run.checkpoint_every=2",
        "run.log_every=1", "run.max_failures=3", "teacher.kind=timm", "teacher.timm.name=test_resnet",
        "teacher.timm.num_classes=10", "student.name=test_resnet", "student.num_classes=10", "student.pretrained=false", "dad.eps=1.0",
        "dad.alpha=1.0", "optim.zero_stage=2", "optim.micro_batch_size=16", "optim.grad_accum=2", "optim.lr=2e-3",
        "optim.warmup_epochs=0.5", "optim.warmup_start_ratio=0", "optim.grad_clip=1.0", "optim.ema_decay=0.9", "pools.teacher.min_actors=1", "pools.teacher.max_actors=1",
        "pools.teacher.gpus_per_actor=0", "pools.teacher.cpus_per_actor=1", "pools.teacher.batch_size=32",
        "pools.student.num_workers=2", "pools.student.gpus_per_worker=0", "pools.student.cpus_per_worker=1",
        *[f"augment.{k}={v}" for k, v in (("crop_size", 32), ("hflip", 0.0), ("auto_augment", "''"),
                                         ("color_jitter", 0.0), ("re_prob", 0.0), ("mixup", 0.0), ("cutmix", 0.0),
                                         ("label_smoothing", 0.0), ("interpolation", "bilinear"))]])
    cfg.vqgan = TINY_VQ
    return cfg


def _metrics(folder: Path, *, events: bool = False) -> list[dict]:
    """The rows of a student's metrics.jsonl: the step rows, or (``events``) also the resume events."""
    path = folder / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return rows if events else [r for r in rows if "resumed_from" not in r]


def test_a_dad_pass_that_loses_a_student_node_resumes_where_an_unbroken_run_goes(ray_cluster, even_shards, tmp_path):
    steps = 2 * EVEN // 64  # 2 epochs of 4 steps: 2 workers x 16 x 2 micro-batches per step
    baseline = _dad_cfg(even_shards, tmp_path, "unbroken")
    baseline.logging = LoggingConfig(wandb=True, wandb_mode="offline", wandb_tags=["test"])
    check(baseline)
    clean = train_students(baseline, seed=0, classes=10)

    faulty = _dad_cfg(even_shards, tmp_path, "broken")
    done: dict = {}
    worker = threading.Thread(target=lambda: done.update(train_students(faulty, seed=0, classes=10)))
    worker.start()
    log = tmp_path / "broken" / "dad"
    while not usable_checkpoints(str(tmp_path / "broken" / "ray" / "broken-ce+kd+dad"), log=lambda _: None):
        assert worker.is_alive(), "the run ended before the fault"  # wait for the first stored checkpoint (step 2)
        time.sleep(0.05)
    lost = ray_cluster.students[0]
    ray_cluster.remove(lost)  # a preempted node: its worker dies with it
    ray_cluster.add("student")  # capacity returns; Ray Train restarts the group from the latest checkpoint
    worker.join(timeout=600)
    assert not worker.is_alive() and set(done) == {"ce", "kd", "dad"}

    for method in ("ce", "kd", "dad"):
        rows, unbroken = _metrics(log.parent / method, events=True), _metrics(tmp_path / "unbroken" / method)
        resumed = [r for r in rows if "resumed_from" in r]
        assert len(resumed) == 1 and resumed[0]["step"] >= 2, "the restart did not resume from a checkpoint"
        restart = rows.index(resumed[0])
        logged = [r["step"] for r in rows if "resumed_from" not in r]
        assert logged[restart] == resumed[0]["step"] + 1  # the step count continues after the checkpoint
        assert sorted(set(logged)) == list(range(1, steps + 1)) == [r["step"] for r in unbroken]
        # the same seed gives the same run: every metrics row equals the unbroken run's at its step
        by_step = {r["step"]: r for r in unbroken}
        for row in rows[:restart] + rows[restart + 1:]:
            assert row["loss"] == pytest.approx(by_step[row["step"]]["loss"], rel=1e-6, abs=1e-7)
        # the models, optimizers, schedulers, EMAs and data position resumed exactly: the same export
        a, b = _export(done[method].path), _export(clean[method].path)
        moved = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        assert moved < 1e-5, f"{method}: the resumed run's export differs by {moved}"
    assert {"kd_clean", "kd_adv"} <= set(_metrics(log)[-1])  # the DAD student learned from DAD samples
    # the EMA is what was exported: it differs from the engine's last weights in the latest checkpoint
    ckpt = _latest_checkpoint(tmp_path / "broken" / "ray") / "dad"
    ema = torch.load(ckpt / "ema.pt", weights_only=True)
    exported = _export(done["dad"].path)
    assert all(torch.equal(ema[f"model.{k}"].float(), v.float()) for k, v in exported.items())
    raw = torch.load(ckpt / CKPT_TAG / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert any(not torch.equal(raw[f"model.{k}"].float(), v.float()) for k, v in exported.items() if v.is_floating_point())
    # TensorBoard (read back with its own reader) and W&B (offline) got the rows of metrics.jsonl
    for method in ("ce", "kd", "dad"):
        folder = tmp_path / "unbroken" / method
        events = EventAccumulator(str(folder / TENSORBOARD))
        events.Reload()
        rows = _metrics(folder)
        for tag in ("loss", "lr", "samples_per_s", "object_store_bytes", "teacher_actors_alive", "skipped"):
            logged = [(e.step, e.value) for e in events.Scalars(f"train/{tag}")]
            assert logged == [(r["step"], pytest.approx(r[tag], rel=1e-6)) for r in rows], tag
        (summary,) = folder.glob("wandb/offline-run-*/files/wandb-summary.json")
        assert json.loads(summary.read_text())["train/loss"] == pytest.approx(rows[-1]["loss"], rel=1e-6)
    # the stream stayed within its object-store bound (Ray's own accounting), with Ray Data's slack of
    # a block per operator in flight
    peak = max(r["object_store_bytes"] for r in _metrics(tmp_path / "unbroken" / "dad"))
    assert peak <= 8 * 2**20 + 4 * 32 * (2 * 32 * 32 * 3 + 2 * 10 * 2)
