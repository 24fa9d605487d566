"""The student pool: Ray Train TorchTrainer workers running DeepSpeed ZeRO on a stream of batches.

Each worker builds the task's module (same seed on every rank), wraps it with ``deepspeed.initialize``
(config derived from ``OptimConfig``) and reads its split of the stream (Ray Data streaming split:
bounded, backpressured; with ``data.preserve_order`` the same split on every run). An epoch is a fixed
number of micro-batches on every rank (ZeRO ranks step in lock-step); all epochs are one stream.
Checkpoints (DeepSpeed's own, per rank, plus the EMA and the train state) are reported to Ray Train
every ``checkpoint_every`` steps and at each epoch's end; a restarted worker group, or a restarted run
with the same name, resumes model, optimizer, scheduler, step and data position. Rank 0 writes
``metrics.jsonl`` and exports the trained module.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
from cluster.engine.deepspeed_config import OptimConfig, deepspeed_config
from cluster.engine.pools import STUDENT_RESOURCE, TEACHER_RESOURCE, StudentPoolConfig
from cluster.engine.tasks import StudentTask
from robust.seeding import combine, seed_everything

CKPT_TAG = "ckpt"
EMA_FILE = "ema.pt"
DONE = "done.json"  # rank 0 writes it after the export, with the training cost: a finished model


@dataclass
class TrainJob:
    """Everything a worker needs; picklable, built by the job from its typed config."""

    task: StudentTask  # what is trained on each batch: cluster.engine.tasks
    optim: OptimConfig
    epochs: int
    steps_per_epoch: int  # optimizer steps per epoch, identical on every rank (ZeRO needs lock-step)
    run_dir: str  # metrics.jsonl and the export go here
    seed: int  # the student's initialisation (same on every rank) and its dropout (per rank)
    checkpoint_every: int = 200
    log_every: int = 10
    log_keys: bool = False  # debug: every rank appends the (epoch, key) of each sample it trains on to keys.rank<r>.jsonl
    resume: ray.actor.ActorHandle | None = None  # cluster.engine.streams.ResumePoint shared with the read tasks
    started_at: float = 0.0  # time.time() when the driver submitted it: the start-up cost runs from here


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0  # optimizer steps done
    micro_in_epoch: int = 0  # micro-batches consumed in the current epoch (the data position)
    samples: int = 0  # valid samples trained on by this rank
    first_batch_at: float = 0.0  # time.time() of the first micro-batch of the run (kept across restarts)


@dataclass
class _Window:
    sums: dict[str, float] = field(default_factory=dict)  # loss terms summed over micro-batches
    counts: dict[str, int] = field(default_factory=dict)  # micro-batches that reported each term
    samples: int = 0
    skipped: list[str] = field(default_factory=list)  # "key: reason" of placeholder rows
    t0: float = field(default_factory=time.perf_counter)


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


def teacher_actors_alive() -> int:
    """Teacher-pool actors alive now, from Ray's state API (actors holding the "teacher" resource)."""
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                         detail=True, limit=10_000, raise_on_missing_output=False)
    return sum(TEACHER_RESOURCE in (a.required_resources or {}) for a in actors)


def object_store_used_bytes() -> float:
    """Object store bytes in use across the cluster (Ray's resource view), the stream's data in flight."""
    return ray.cluster_resources().get("object_store_memory", 0.0) - ray.available_resources().get(
        "object_store_memory", 0.0)


def _log(window: _Window, state: TrainState, engine, job: TrainJob, rank: int) -> dict:
    # every rank gathers the same term names (a rank may have seen only placeholders in this window)
    gathered = _all_gather((sorted(window.sums), window.skipped))
    keys = sorted({k for names, _ in gathered for k in names})
    totals = _all_reduce_sum([window.samples, *(window.sums.get(k, 0.0) for k in keys),
                              *(window.counts.get(k, 0) for k in keys)])
    samples, sums, counts = totals[0], totals[1:1 + len(keys)], totals[1 + len(keys):]
    dt = time.perf_counter() - window.t0
    skipped = [k for _, part in gathered for k in part]
    row = {"epoch": state.epoch, "step": state.step, "lr": engine.get_lr()[0],
           **{k: v / max(c, 1) for k, v, c in zip(keys, sums, counts)},
           "samples": int(samples), "window_s": dt, "samples_per_s": samples / max(dt, 1e-9),
           "skipped": len(skipped), "skipped_keys": skipped}
    if rank == 0:
        row |= {"teacher_actors_alive": teacher_actors_alive(), "object_store_bytes": object_store_used_bytes()}
        with open(Path(job.run_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{Path(job.run_dir).name}] epoch {state.epoch + 1}/{job.epochs} step {state.step}/"
              f"{job.epochs * job.steps_per_epoch} loss {row.get('loss', float('nan')):.4f} "
              f"{row['samples_per_s']:.0f} samples/s", flush=True)
    return row


def _save(engine, ema: ModelEmaV3 | None, state: TrainState, metrics: dict) -> None:
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=CKPT_TAG, client_state={"train_state": asdict(state)})
        if ema is not None and ray.train.get_context().get_world_rank() == 0:
            torch.save(ema.module.state_dict(), Path(d) / EMA_FILE)
        ray.train.report({k: v for k, v in metrics.items() if k != "skipped_keys"},
                         checkpoint=Checkpoint.from_directory(d))


def _restore(engine, ema: ModelEmaV3 | None) -> TrainState:
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return TrainState()
    with ckpt.as_directory() as d:
        _, client = engine.load_checkpoint(d, tag=CKPT_TAG)
        if ema is not None:
            ema.module.load_state_dict(torch.load(Path(d) / EMA_FILE, weights_only=True))
    return TrainState(**client["train_state"])


def _full_state_dict(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    if engine.zero_optimization_stage() == 3:  # parameters are partitioned: gather them to export
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    return {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}


def _log_keys(job: TrainJob, rank: int, step: int, batch: dict[str, np.ndarray]) -> None:
    rows = [{"step": step, "epoch": int(e), "key": str(k)} for e, k, v in
            zip(batch[B.EPOCH], batch[B.KEY], batch[B.VALID]) if v]
    with open(Path(job.run_dir) / f"keys.rank{rank}.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def train_loop(config: dict) -> None:
    """The per-worker loop (Ray Train calls it on every worker)."""
    import deepspeed

    job: TrainJob = config["job"]
    os.nice(config["nice"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(job.seed)  # the same initialisation on every rank
    model = job.task.build()
    ds_cfg = deepspeed_config(job.optim, world_size=world, total_steps=job.epochs * job.steps_per_epoch,
                              on_gpu=torch.cuda.is_available())
    engine, *_ = deepspeed.initialize(model=model, config=ds_cfg, dist_init_required=False,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    # ZeRO <= 2 keeps full parameters on every rank, so every rank's EMA is the same (validate_optim).
    ema = ModelEmaV3(engine.module, decay=job.optim.ema_decay) if job.optim.ema_decay else None
    state = _restore(engine, ema)
    seed_everything(combine([job.seed, rank, state.step]))  # dropout and task-side draws, per rank
    if job.resume is not None:  # the read tasks skip the epochs before this one (set before reading)
        ray.get(job.resume.set.remote(state.epoch))
    micro_per_epoch = job.steps_per_epoch * job.optim.grad_accum
    shard = ray.train.get_dataset_shard("train")
    # The stream starts at the resumed epoch; its first micro_in_epoch micro-batches are the ones done
    # before the checkpoint. Rows past the last step are left unread.
    batches = iter(shard.iter_batches(batch_size=job.optim.micro_batch_size, drop_last=True))
    for _ in range(state.micro_in_epoch):
        next(batches, None)
    window = _Window()
    engine.train()
    while state.epoch < job.epochs:
        batch = next(batches, None)
        if batch is None:
            raise RuntimeError(f"the stream ended at step {state.step} of {job.epochs * job.steps_per_epoch}: "
                               "the shard manifests promise more samples than the stream delivered")
        B.validate(batch, needs=job.task.needs)
        state.first_batch_at = state.first_batch_at or time.time()
        terms = _micro_step(engine, job.task, batch)
        state.micro_in_epoch += 1
        n_valid = int(batch[B.VALID].sum())
        state.samples += n_valid
        window.samples += n_valid
        window.skipped += [f"{k}: {r}" for k, r, v in zip(batch[B.KEY], batch[B.SKIP_REASON], batch[B.VALID]) if not v]
        for k, v in terms.items():
            window.sums[k] = window.sums.get(k, 0.0) + float(v)
            window.counts[k] = window.counts.get(k, 0) + 1
        if job.log_keys:
            _log_keys(job, rank, state.step, batch)
        if state.micro_in_epoch % job.optim.grad_accum:
            continue
        state.step += 1
        if ema is not None:
            ema.update(engine.module, step=state.step)
        epoch_done = state.micro_in_epoch == micro_per_epoch
        if epoch_done or state.step % job.log_every == 0 or state.step % job.checkpoint_every == 0:
            row = _log(window, state, engine, job, rank)
            window = _Window()
            if epoch_done:
                state.micro_in_epoch, state.epoch = 0, state.epoch + 1
            if epoch_done or state.step % job.checkpoint_every == 0:
                _save(engine, ema, state, row)
    full = _full_state_dict(engine) if ema is None else ema.module.state_dict()
    samples = int(_all_reduce_sum([state.samples])[0])
    if rank == 0:
        model.load_state_dict(full)
        job.task.export(model, job.run_dir)
        cost = {"startup_s": state.first_batch_at - job.started_at, "train_s": time.time() - state.first_batch_at,
                "train_samples": samples}
        (Path(job.run_dir) / DONE).write_text(json.dumps(cost))


def fit(job: TrainJob, dataset: ray.data.Dataset, pool: StudentPoolConfig, *, name: str, storage_path: str,
        execution: ExecutionOptions, max_failures: int = 3) -> ray.train.Result:
    """Train on ``dataset`` with ``pool.num_workers`` DeepSpeed workers; resumes run ``name`` if it exists."""
    os.makedirs(job.run_dir, exist_ok=True)
    use_gpu = pool.gpus_per_worker > 0
    resources = {"CPU": pool.cpus_per_worker, STUDENT_RESOURCE: 1}
    if use_gpu:
        resources["GPU"] = pool.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": job, "nice": pool.nice},
        scaling_config=ScalingConfig(num_workers=pool.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets={"train": dataset},
        dataset_config=DataConfig(execution_options=execution),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    return trainer.fit()
