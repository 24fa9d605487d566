"""The student pool: Ray Train TorchTrainer workers running DeepSpeed ZeRO on a stream of batches.

One pass trains one or several students (``TrainJob.tasks``, e.g. the CE, KD and DAD students of a
run): each worker builds every task's module (the same seed on every rank and for every task), wraps
each with its own ``deepspeed.initialize`` (config derived from ``OptimConfig``) and steps all of them
on every micro-batch of its split of the stream (Ray Data streaming split: bounded, backpressured; with
``data.preserve_order`` the same split on every run). So the students see the same batches in the same
order (their differences are paired) and the teacher pool works once for all of them. An epoch is a
fixed number of micro-batches on every rank (ZeRO ranks step in lock-step); all epochs are one stream.
Checkpoints (DeepSpeed's own per engine and rank, the EMAs and the train state) are reported to Ray Train
every ``checkpoint_every`` steps and at each epoch's end; a restarted worker group, or a restarted run
with the same name, resumes models, optimizers, schedulers, step and data position. Rank 0 writes each
task's ``metrics.jsonl`` and exports it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.data import ExecutionOptions
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from timm.utils import ModelEmaV3

from cluster.engine import batch as B
from cluster.engine.checkpoints import Stored, check_resumable, usable_checkpoints, write_manifest
from cluster.engine.deepspeed_config import OptimConfig, deepspeed_config
from cluster.engine.cluster_stats import object_store_used_bytes, teacher_actors_alive
from cluster.engine.pools import STUDENT_RESOURCE, StudentPoolConfig
from cluster.engine.tasks import StudentTask
from cluster.engine.tracking import LoggingConfig, Tracker
from cluster.engine.worker_console import console, no_prints, quiet
from robust.seeding import combine, seed_everything

CKPT_TAG = "ckpt"
EMA_FILE = "ema.pt"
DONE = "done.json"  # rank 0 writes it beside a task's export, with the training cost: a finished model


@dataclass
class TrainJob:
    """Everything a worker needs; picklable, built by the job from its typed config."""

    tasks: dict[str, StudentTask]  # name -> what is trained (cluster.engine.tasks); each in run_dir/<name>
    optim: OptimConfig
    epochs: int
    steps_per_epoch: int  # optimizer steps per epoch, identical on every rank (ZeRO needs lock-step)
    run_dir: str
    seed: int  # the students' initialisation (same on every rank) and their dropout (per rank)
    checkpoint_every: int = 200
    log_every: int = 10
    log_keys: bool = False  # debug: every rank appends the (epoch, key) of each sample it trains on to keys.rank<r>.jsonl
    resume: ray.actor.ActorHandle | None = None  # cluster.engine.streams.ResumePoint shared with the read tasks
    started_at: float = 0.0  # time.time() when the driver submitted it: the start-up cost runs from here
    checkpoint_root: str = ""  # where Ray Train stores this run's checkpoints (set by ``fit``)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    group: str = ""  # the job's run name: the W&B group of its students

    @property
    def needs(self) -> set[str]:
        return {c for task in self.tasks.values() for c in task.needs}


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0  # optimizer steps done
    micro_in_epoch: int = 0  # micro-batches consumed in the current epoch (the data position)
    samples: int = 0  # valid samples trained on by this rank
    first_batch_at: float = 0.0  # time.time() of the first micro-batch of the run (kept across restarts)
    compute_s: dict[str, float] = field(default_factory=dict)  # each task's own step time on this rank


@dataclass
class _Window:
    """What a task's next metrics row averages over."""

    sums: dict[str, float] = field(default_factory=dict)  # loss terms summed over micro-batches
    counts: dict[str, int] = field(default_factory=dict)  # micro-batches that reported each term
    compute_s: float = 0.0


@dataclass
class _Student:
    """One task on this worker: its module, DeepSpeed engine, EMA and metrics window."""

    name: str
    task: StudentTask
    engine: Any
    ema: ModelEmaV3 | None
    out: Path  # its export, metrics.jsonl and done.json
    window: _Window = field(default_factory=_Window)
    tracker: Tracker | None = None  # rank 0's TensorBoard / W&B run of this student


def _micro_step(engine, task: StudentTask, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    valid = np.asarray(batch[B.VALID])
    if not valid.any():  # a micro-batch of placeholders still steps, with zero loss, for lock-step
        loss = sum(p.sum() * 0 for p in engine.module.parameters() if p.requires_grad)
        engine.backward(loss)
        engine.step()
        return {}
    rows = {k: np.asarray(v)[valid] for k, v in batch.items()}

    def forward(x: torch.Tensor):
        return engine(x.to(dtype=torch.bfloat16) if engine.bfloat16_enabled() and x.is_floating_point() else x)

    loss, terms = task.loss(forward, rows, device=engine.device)
    engine.backward(loss)
    engine.step()
    return terms


def _all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _all_gather(obj: object) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@dataclass
class _Shared:
    """What every task's metrics row of one window shares: the data and the time."""

    samples: int = 0
    skipped: list[str] = field(default_factory=list)  # "key: reason" of placeholder rows
    t0: float = field(default_factory=time.perf_counter)


def _log(students: list[_Student], shared: _Shared, state: TrainState, job: TrainJob, rank: int) -> dict[str, dict]:
    """One metrics row per task (reduced over ranks); rank 0 appends them and prints one line."""
    # every rank gathers the same term names (a rank may have seen only placeholders in this window)
    gathered = _all_gather(([sorted(s.window.sums) for s in students], shared.skipped))
    samples = int(_all_reduce_sum([shared.samples])[0])
    dt = time.perf_counter() - shared.t0
    common = {"epoch": state.epoch, "step": state.step, "samples": samples, "window_s": dt,
              "samples_per_s": samples / max(dt, 1e-9), "skipped": sum(len(part) for _, part in gathered),
              "skipped_keys": [k for _, part in gathered for k in part]}
    if rank == 0:
        common |= {"teacher_actors_alive": teacher_actors_alive(), "object_store_bytes": object_store_used_bytes()}
    rows = {}
    for i, s in enumerate(students):
        keys = sorted({k for names, _ in gathered for k in names[i]})
        totals = _all_reduce_sum([*(s.window.sums.get(k, 0.0) for k in keys), *(s.window.counts.get(k, 0) for k in keys),
                                  s.window.compute_s])
        sums, counts = totals[: len(keys)], totals[len(keys): 2 * len(keys)]
        world = dist.get_world_size() if dist.is_initialized() else 1
        rows[s.name] = {**common, "lr": s.engine.get_lr()[0], **{k: v / max(c, 1) for k, v, c in zip(keys, sums, counts)},
                        "compute_s": totals[-1] / world}
        s.window = _Window()
    if rank == 0:
        for s in students:
            with open(s.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rows[s.name]) + "\n")
            s.tracker.log(rows[s.name], step=state.step, prefix="train")
        losses = "  ".join(f"{name} {row.get('loss', float('nan')):.4f}" for name, row in rows.items())
        console(f"[{Path(job.run_dir).name}] epoch {state.epoch + 1}/{job.epochs} step {state.step}/"
                f"{job.epochs * job.steps_per_epoch} loss {losses}  {common['samples_per_s']:.0f} samples/s")
    return rows


def _save(students: list[_Student], state: TrainState, metrics: dict) -> None:
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    with tempfile.TemporaryDirectory() as d:
        for s in students:
            s.engine.save_checkpoint(str(Path(d) / s.name), tag=CKPT_TAG, client_state={"train_state": asdict(state)})
            if s.ema is not None and rank == 0:
                torch.save(s.ema.module.state_dict(), Path(d) / s.name / EMA_FILE)
        write_manifest(Path(d), rank=rank, world=world, step=state.step, epoch=state.epoch)  # last: marks it complete
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                         checkpoint=Checkpoint.from_directory(d))


def _restore(students: list[_Student], newest: Stored | None, world: int, rank: int) -> TrainState:
    """The train state of ``newest`` (the newest complete checkpoint in the run's storage), with every
    student's engine and EMA loaded from it; a fresh state without one."""
    log = console if rank == 0 else (lambda _: None)
    if newest is None:
        return TrainState()  # (checkpoints that exist but are all unusable stop the run on the driver)
    if newest.world != world:  # the driver refuses this before training (check_resumable)
        raise RuntimeError(f"{newest.path} was written by {newest.world} workers, this group has {world}")
    with Checkpoint(newest.path, filesystem=newest.filesystem).as_directory() as d:
        held = sorted(p.name for p in Path(d).iterdir() if p.is_dir())
        if held != sorted(s.name for s in students):
            raise ValueError(f"the run's latest checkpoint holds the students {held}, this run trains "
                             f"{sorted(s.name for s in students)}; keep run.methods as they were or choose a new run.name")
        for s in students:
            _, client = s.engine.load_checkpoint(str(Path(d) / s.name), tag=CKPT_TAG)
            if s.ema is not None:
                s.ema.module.load_state_dict(torch.load(Path(d) / s.name / EMA_FILE, weights_only=True))
    log(f"resumed from {newest.path} at step {newest.step}")
    if rank == 0:  # the metrics show where the run came back
        for s in students:
            with open(s.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": newest.step, "resumed_from": newest.path}) + "\n")
    return TrainState(**client["train_state"])


class _Prefetched:
    """An iterator whose first item is fetched in a background thread from the moment it is made."""

    def __init__(self, items) -> None:
        self._items = iter(items)
        self._first: list = []
        self._thread = threading.Thread(target=lambda: self._first.append(next(self._items, None)), daemon=True)
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is not None:
            self._thread.join()
            self._thread, (first,) = None, self._first
            if first is None:
                raise StopIteration
            return first
        return next(self._items)


def _full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The module's full weights; with ZeRO-3 every rank takes part in gathering the partitions."""
    import deepspeed

    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    return {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}


def _log_keys(job: TrainJob, rank: int, rows: list[dict]) -> None:
    """keys.rank<r>.jsonl: an attempt's start ({"attempt_from_step": s}: what an earlier attempt logged from
    step s on was redone), then a row per sample trained on ({"step", "epoch", "key"})."""
    with open(Path(job.run_dir) / f"keys.rank{rank}.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def _build(job: TrainJob, world: int) -> list[_Student]:
    import deepspeed

    ds_cfg = deepspeed_config(job.optim, world_size=world, total_steps=job.epochs * job.steps_per_epoch,
                              steps_per_epoch=job.steps_per_epoch, on_gpu=torch.cuda.is_available())
    students = []
    for name, task in job.tasks.items():
        seed_everything(job.seed)  # the same initialisation on every rank, and for every task
        model = task.build()
        with no_prints():
            engine, *_ = deepspeed.initialize(model=model, config=ds_cfg, dist_init_required=False,
                                              model_parameters=[p for p in model.parameters() if p.requires_grad])
        # ZeRO <= 2 keeps full parameters on every rank, so every rank's EMA is the same (validate_optim).
        ema = ModelEmaV3(engine.module, decay=job.optim.ema_decay) if job.optim.ema_decay else None
        students.append(_Student(name, task, engine, ema, Path(job.run_dir) / name))
    return students


def train_loop(config: dict) -> None:
    """The per-worker loop (Ray Train calls it on every worker)."""
    # DeepSpeed's accelerator from the pool's resources: its auto-detection logs a warning on CPU workers
    os.environ.setdefault("DS_ACCELERATOR", config["accelerator"])
    quiet(config["log_level"])
    job: TrainJob = config["job"]
    os.nice(config["nice"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    stored = usable_checkpoints(job.checkpoint_root, log=console if rank == 0 else (lambda _: None))
    newest = stored[0] if stored else None
    if job.resume is not None:  # the read tasks skip the epochs before this one (set before reading)
        ray.get(job.resume.set.remote(newest.epoch if newest else 0))
    # The stream starts at the resumed epoch, while the students are built (its first batch takes as long
    # as their engines); two micro-batches are prefetched (their copies to a GPU then overlap the steps).
    # Rows past the last step are left unread.
    batches = _Prefetched(ray.train.get_dataset_shard("train").iter_batches(batch_size=job.optim.micro_batch_size,
                                                                            drop_last=True, prefetch_batches=2))
    students = _build(job, world)
    state = _restore(students, newest, world, rank)
    if job.log_keys:
        _log_keys(job, rank, [{"attempt_from_step": state.step}])
    for s in students if rank == 0 else []:
        s.tracker = Tracker(job.logging, s.out, name=f"{job.group}/{s.name}", group=job.group)
    micro_per_epoch = job.steps_per_epoch * job.optim.grad_accum
    for _ in range(state.micro_in_epoch):  # the micro-batches of this epoch done before the checkpoint
        next(batches, None)
    shared, needs = _Shared(), job.needs
    for s in students:
        s.engine.train()
    while state.epoch < job.epochs:
        batch = next(batches, None)
        if batch is None:
            raise RuntimeError(f"the stream ended at step {state.step} of {job.epochs * job.steps_per_epoch}: "
                               "the shard manifests promise more samples than the stream delivered")
        B.validate(batch, needs=needs)
        state.first_batch_at = state.first_batch_at or time.time()
        # dropout and drop path draw from (seed, rank, position): a resumed run draws what the first one did
        seed_everything(combine([job.seed, rank, state.epoch, state.micro_in_epoch]))
        for s in students:
            t0 = time.perf_counter()
            for k, v in _micro_step(s.engine, s.task, batch).items():
                s.window.sums[k] = s.window.sums.get(k, 0.0) + float(v)
                s.window.counts[k] = s.window.counts.get(k, 0) + 1
            s.window.compute_s += time.perf_counter() - t0
            state.compute_s[s.name] = state.compute_s.get(s.name, 0.0) + time.perf_counter() - t0
        state.micro_in_epoch += 1
        n_valid = int(batch[B.VALID].sum())
        state.samples += n_valid
        shared.samples += n_valid
        shared.skipped += [f"{k}: {r}" for k, r, v in zip(batch[B.KEY], batch[B.SKIP_REASON], batch[B.VALID]) if not v]
        if job.log_keys:
            _log_keys(job, rank, [{"step": state.step, "epoch": int(e), "key": str(k)}
                                  for e, k, v in zip(batch[B.EPOCH], batch[B.KEY], batch[B.VALID]) if v])
        if state.micro_in_epoch % job.optim.grad_accum:
            continue
        state.step += 1
        for s in students:
            if s.ema is not None:
                s.ema.update(s.engine.module, step=state.step)
        epoch_done = state.micro_in_epoch == micro_per_epoch
        if epoch_done or state.step % job.log_every == 0 or state.step % job.checkpoint_every == 0:
            rows = _log(students, shared, state, job, rank)
            shared = _Shared()
            if epoch_done:
                state.micro_in_epoch, state.epoch = 0, state.epoch + 1
            if epoch_done or state.step % job.checkpoint_every == 0:
                _save(students, state, next(iter(rows.values())))
    _export(students, state, job, rank)


def _export(students: list[_Student], state: TrainState, job: TrainJob, rank: int) -> None:
    samples, *compute = _all_reduce_sum([state.samples, *(state.compute_s.get(s.name, 0.0) for s in students)])
    world = dist.get_world_size() if dist.is_initialized() else 1
    for s, compute_s in zip(students, compute):
        full = _full_state_dict(s.engine) if s.ema is None else s.ema.module.state_dict()
        if rank == 0:
            # a fresh module: under ZeRO-3 the engine's own parameters stay partitioned outside the gather
            model = s.task.build()
            model.load_state_dict(full)
            s.task.export(model, s.out)
            # train_s: this student's own steps (a rank's mean); the pass also waited for data and the other students
            cost = {"startup_s": state.first_batch_at - job.started_at, "train_s": compute_s / world,
                    "pass_s": time.time() - state.first_batch_at, "train_samples": int(samples), "steps": state.step}
            (s.out / DONE).write_text(json.dumps(cost))
            s.tracker.close()


def fit(job: TrainJob, dataset: ray.data.Dataset, pool: StudentPoolConfig, *, name: str, storage_path: str,
        execution: ExecutionOptions, max_failures: int = 3) -> ray.train.Result:
    """Train on ``dataset`` with ``pool.num_workers`` DeepSpeed workers; resumes run ``name`` if it exists."""
    for task_name in job.tasks:
        os.makedirs(Path(job.run_dir) / task_name, exist_ok=True)
    use_gpu = pool.gpus_per_worker > 0
    resources = {"CPU": pool.cpus_per_worker, STUDENT_RESOURCE: 1}
    if use_gpu:
        resources["GPU"] = pool.gpus_per_worker
    job = dataclasses.replace(job, checkpoint_root=f"{storage_path.rstrip('/')}/{name}")
    # Ray Train's own reports (checkpoint created, result reported) at the level ray.init gave Ray's loggers
    train_logs = ray.train.LoggingConfig(log_level=logging.getLevelName(logging.getLogger("ray").getEffectiveLevel()))
    check_resumable(job.checkpoint_root, pool.num_workers)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": job, "nice": pool.nice, "log_level": train_logs.log_level,
                           "accelerator": "cuda" if use_gpu else "cpu"},
        scaling_config=ScalingConfig(num_workers=pool.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets={"train": dataset},
        dataset_config=DataConfig(execution_options=execution),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), logging_config=train_logs),
    )
    return trainer.fit()
