"""A user's restart: the DAD recipe (offline DAD, a 2-seed study) joins the cluster as its own driver process,
is killed mid-training, and is run again with the same run.name: first on another number of workers (refused
before training), then after the newest checkpoint was damaged (it falls back to the one before, says so,
and the step count goes on); the seed that had finished is not trained again, and the study reports both."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ray

from cluster.engine.checkpoints import usable_checkpoints
from robust.models.vqgan import VQGAN_PRESETS
from tests.conftest import EVEN

REPO = Path(__file__).resolve().parents[1]


def _command(shards: Path, out: Path, *extra: str) -> list[str]:
    vq = {**VQGAN_PRESETS["digits32_f4_128"], "n_embed": 16}
    vqgan = [f"vqgan.{k}={json.dumps(v).replace(' ', '')}" for k, v in vq.items()]
    return [sys.executable, str(REPO / "recipes" / "dad_imagenet.py"), f"ray.address={ray.get_runtime_context().gcs_address}",
            f"data.train_shards={shards}", f"data.test_shards={shards}", "data.max_in_flight_mb=16",
            f"run.out_dir={out}", "run.name=study", "run.methods=[ce,dad]", "run.seeds=[0,1]", "run.epochs=2",
            "run.checkpoint_every=2", "run.log_every=1", "dad.mode=offline", "dad.eps=1.0", "dad.alpha=1.0",
            "teacher.kind=timm", "teacher.timm.name=test_resnet", "teacher.timm.num_classes=10",
            "student.name=test_resnet", "student.num_classes=10", "student.pretrained=false", "optim.micro_batch_size=32",
            "optim.warmup_epochs=0.5", "optim.ema_decay=0",
            "pools.teacher.min_actors=1", "pools.teacher.max_actors=1", "pools.teacher.gpus_per_actor=0",
            "pools.teacher.cpus_per_actor=1", "pools.teacher.batch_size=32", "pools.student.num_workers=2",
            "pools.student.gpus_per_worker=0", "pools.student.cpus_per_worker=1", "augment.crop_size=32",
            "augment.hflip=0.0", "augment.auto_augment=''", "augment.color_jitter=0.0", "augment.re_prob=0.0",
            "augment.mixup=0.0", "augment.cutmix=0.0", "augment.label_smoothing=0.0", "augment.interpolation=bilinear",
            "eval.corruptions=[gaussian_noise]", "eval.severities=[3]", *vqgan, *extra]


def _run(cmd: list[str], log: Path) -> subprocess.CompletedProcess:
    with log.open("w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=900, cwd=REPO)


def _steps(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def test_a_killed_driver_resumes_the_run_it_left(ray_cluster, even_shards, tmp_path):
    run = tmp_path / "study"
    root = run / "ray" / "study-seed1-ce+dad"
    # 1. the driver dies in seed 1's pass, after its second stored checkpoint
    with (tmp_path / "first.log").open("w") as log:
        driver = subprocess.Popen(_command(even_shards, tmp_path), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                  start_new_session=True)
        deadline = time.monotonic() + 600
        while len(usable_checkpoints(str(root), log=lambda _: None)) < 2:
            assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    seed0 = run / "seed-0"
    finished = {m: (seed0 / m / "done.json").read_text() for m in ("ce", "dad")}
    assert (seed0 / "report.json").is_file() and not (run / "seed-1" / "ce" / "done.json").exists()
    stored = usable_checkpoints(str(root), log=lambda _: None)

    # 2. on one worker instead of two: refused before training, with what to do
    done = _run(_command(even_shards, tmp_path, "pools.student.num_workers=1"), tmp_path / "one.log")
    text = (tmp_path / "one.log").read_text()
    assert done.returncode != 0 and "written by 2 student workers" in text and "pools.student.num_workers=2" in text
    assert stored == usable_checkpoints(str(root), log=lambda _: None)  # nothing was written

    # 3. the newest checkpoint is damaged (a truncated file): the run falls back to the one before
    newest, before = stored[0], stored[1]
    damaged = Path(newest.path) / "ce" / "ckpt" / "mp_rank_00_model_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    done = _run(_command(even_shards, tmp_path), tmp_path / "again.log")
    assert done.returncode == 0, (tmp_path / "again.log").read_text()[-3000:]

    assert {m: (seed0 / m / "done.json").read_text() for m in ("ce", "dad")} == finished  # not trained again
    for method in ("ce", "dad"):
        rows = _steps(run / "seed-1" / method / "metrics.jsonl")
        resumed = [r for r in rows if "resumed_from" in r]
        assert [r["resumed_from"] for r in resumed] == [before.path] and resumed[0]["step"] == before.step
        after = rows[rows.index(resumed[0]) + 1]
        assert after["step"] == before.step + 1  # the step count continues from the checkpoint it used
        assert rows[-1]["step"] == 2 * EVEN // 64
    study = json.loads((run / "study.json").read_text())
    assert study["seeds"] == [0, 1] and {p["a"] + "-" + p["b"] for p in study["pairs"]} == {"dad-ce"}
    assert (run / "study.md").is_file() and (run / "seed-1" / "report.json").is_file()
