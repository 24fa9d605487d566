"""Student pool: Ray Train TorchTrainer workers running DeepSpeed ZeRO on the teacher pool's stream.

Each worker builds the student, wraps it with ``deepspeed.initialize`` and reads its shard of the
teacher pool's output (Ray Data streaming split: bounded, backpressured). Checkpoints (DeepSpeed's
own, per rank) are reported to Ray Train every N steps and at each epoch's end; a restarted worker
or a restarted run with the same name resumes model, optimizer, scheduler, step and data position.
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

from cluster.config import STUDENT_RESOURCE, StudentPoolConfig
from cluster.deepspeed_config import OptimConfig, deepspeed_config
from timm.utils import ModelEmaV3

from cluster.student_tasks import StudentTask

CKPT_TAG = "ckpt"
EMA_FILE = "ema.pt"


@dataclass
class StudentJob:
    """Everything a worker needs; picklable, built by the recipe from its typed config."""

    task: StudentTask  # what is trained on each batch: cluster.student_tasks
    optim: OptimConfig
    epochs: int
    steps_per_epoch: int  # optimizer steps per epoch, identical on every rank (ZeRO needs lock-step)
    run_dir: str  # metrics.jsonl and the exported student go here
    checkpoint_every: int = 200
    log_every: int = 10
    export_stem: str = "student"
    resume: ray.actor.ActorHandle | None = None  # cluster.pipeline.ResumePoint shared with the read tasks
    # Test hooks: the rank that exits once at this global step (0: never), and a file of the
    # (epoch, key, teacher pid) of every sample trained on.
    fail_at_step: int = 0
    record_ids: bool = False


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0  # optimizer steps done
    micro_in_epoch: int = 0  # micro-batches consumed in the current epoch (the data position)
    samples: int = 0
    corrupt: int = 0


@dataclass
class _Window:
    sums: dict[str, float] = field(default_factory=dict)
    n: int = 0
    samples: int = 0
    corrupt: int = 0
    teachers: set = field(default_factory=set)
    t0: float = field(default_factory=time.perf_counter)


def _micro_step(engine, task: StudentTask, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    valid = np.asarray(batch["valid"])
    if not valid.any():  # a batch of only corrupt samples still steps, with zero loss, for lock-step
        loss = sum(p.sum() * 0 for p in engine.module.parameters() if p.requires_grad)
        engine.backward(loss)
        engine.step()
        return {"loss": torch.zeros((), device=engine.device)}
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


def _log(window: _Window, state: TrainState, engine, job: StudentJob, rank: int) -> dict:
    keys = sorted(window.sums)
    totals = _all_reduce_sum([window.n, window.samples, window.corrupt, *(window.sums[k] for k in keys)])
    n, samples, corrupt = totals[:3]
    dt = time.perf_counter() - window.t0
    row = {"epoch": state.epoch, "step": state.step, "lr": engine.get_lr()[0],
           **{k: v / max(n, 1) for k, v in zip(keys, totals[3:])},
           "samples": int(samples), "window_s": dt, "samples_per_s": samples / max(dt, 1e-9),
           "corrupt_skipped": int(corrupt),
           "teacher_actors_active": len(window.teachers)}
    if rank == 0:
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
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


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


def train_loop(config: dict) -> None:
    """The per-worker loop (Ray Train calls it on every worker)."""
    import deepspeed

    job: StudentJob = config["job"]
    os.nice(config["nice"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(1234 + rank)
    model = job.task.build()
    ds_cfg = deepspeed_config(job.optim, world_size=world, total_steps=job.epochs * job.steps_per_epoch,
                              on_gpu=torch.cuda.is_available())
    engine, *_ = deepspeed.initialize(model=model, config=ds_cfg, dist_init_required=False,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    # ZeRO <= 2 keeps full parameters on every rank, so every rank's EMA is the same (validate_optim).
    ema = ModelEmaV3(engine.module, decay=job.optim.ema_decay) if job.optim.ema_decay else None
    state = _restore(engine, ema)
    if job.resume is not None:  # the read tasks skip the epochs before this one (set before reading)
        ray.get(job.resume.set.remote(state.epoch))
    micro_per_epoch = job.steps_per_epoch * job.optim.grad_accum
    shard = ray.train.get_dataset_shard("train")
    ids_file = Path(job.run_dir) / f"seen_ids.rank{rank}.txt" if job.record_ids else None
    # All epochs are one stream; an epoch is micro_per_epoch micro-batches on every rank (ZeRO ranks step
    # in lock-step). The stream starts at the resumed epoch; the first micro_in_epoch micro-batches are
    # the ones done before the checkpoint. Rows past the last step are left unread.
    batches = iter(shard.iter_batches(batch_size=job.optim.micro_batch_size, drop_last=True))
    for _ in range(state.micro_in_epoch):
        next(batches, None)
    window = _Window()
    engine.train()
    while state.epoch < job.epochs:
        batch = next(batches, None)
        assert batch is not None, "the stream ended before the last step: steps_per_epoch too large"
        terms = _micro_step(engine, job.task, batch)
        state.micro_in_epoch += 1
        n_valid = int(batch["valid"].sum())
        state.samples += n_valid
        state.corrupt += len(batch["valid"]) - n_valid
        window.n += 1
        window.samples += n_valid
        window.corrupt += len(batch["valid"]) - n_valid
        window.teachers.update(np.unique(batch["teacher_pid"]).tolist())
        for k, v in terms.items():
            window.sums[k] = window.sums.get(k, 0.0) + float(v)
        if ids_file is not None:
            with open(ids_file, "a") as f:
                f.write("".join(f"{e} {k} {p}\n" for e, k, p, v in zip(
                    batch["epoch"], batch["key"], batch["teacher_pid"], batch["valid"]) if v))
        if state.micro_in_epoch % job.optim.grad_accum:
            continue
        state.step += 1
        if ema is not None:
            ema.update(engine.module, step=state.step)
        if job.fail_at_step and state.step == job.fail_at_step and rank == world - 1:
            _fail_once(job)
        epoch_done = state.micro_in_epoch == micro_per_epoch
        if epoch_done or state.step % job.log_every == 0 or state.step % job.checkpoint_every == 0:
            row = _log(window, state, engine, job, rank)
            window = _Window()
            if epoch_done:
                state.micro_in_epoch, state.epoch = 0, state.epoch + 1
            if epoch_done or state.step % job.checkpoint_every == 0:
                _save(engine, ema, state, row)
    full = _full_state_dict(engine) if ema is None else ema.module.state_dict()
    if rank == 0:
        model.load_state_dict(full)
        job.task.export(model, job.run_dir, stem=job.export_stem)


def _fail_once(job: StudentJob) -> None:
    marker = Path(job.run_dir) / ".failed_once"
    if not marker.exists():
        marker.write_text("worker failure injected by StudentJob.fail_at_step\n")
        # Ray Train's controller registers reported checkpoints when it polls the workers (every 2 s):
        # wait past one poll so the failure resumes from the latest report deterministically.
        time.sleep(5)
        os._exit(1)


def fit_students(job: StudentJob, dataset: ray.data.Dataset, pool: StudentPoolConfig, *,
                 name: str, storage_path: str, execution: ExecutionOptions, max_failures: int = 3) -> ray.train.Result:
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
