"""`ray job submit` against a real local head (`ray start --head`), token authentication on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    # The job CLI reads the cluster's token from ~/.ray/auth_token (written by `ray start`) when
    # RAY_AUTH_MODE=token; RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH work as well. PATH stays the other
    # tests' PATH: a different `ninja` first on PATH makes torch rebuild DeepSpeed's CPU comm op
    # (about a minute) here and again in the next test.
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    port, dash, agent = _free_port(), _free_port(), _free_port()
    # Its own temp dir: `ray start` records its head as this machine's current cluster there
    # (<temp dir>/ray_current_cluster), and Ray Train's placement-group cleaners in the other tests' cluster
    # look their state API up through that record: pointed at this head after it is gone, each of their
    # runs waited 12 s at its end (Ray Train's timeout for stopping the cleaner).
    temp = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: Ray's socket paths live under it
    # --block keeps this head's processes under one parent, in their own session: killing that
    # process group stops this cluster only (`ray stop` would also stop the other tests' cluster),
    # at once (a SIGTERM'd head takes about 30 s to shut down).
    head = subprocess.Popen([BIN / "ray", "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
                             f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp}",
                             "--num-cpus=4", '--resources={"teacher": 1, "student": 2}', "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while subprocess.run([BIN / "ray", "job", "list", "--address", address], env=env,
                             capture_output=True, timeout=60).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(2)
        yield env, address
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_job_submit_runs_the_local_preset(ray_head, tmp_path):
    env, address = ray_head
    out = tmp_path / "runs"
    cmd = [BIN / "ray", "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
           sys.executable, "recipes/dad_imagenet.py", "preset=local", f"run.out_dir={out}", "run.methods=[ce]",
           "run.epochs=1", "local.teacher.epochs=1", "local.vqgan_steps=5", "eval.corruptions=[gaussian_noise]",
           "eval.severities=[5]"]
    for _ in range(10):  # the head's job agent registers a few seconds after the dashboard answers
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent to submit job" not in done.stderr:
            break
        time.sleep(3)
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "local" / "report.json").read_text())
    assert set(report["models"]) == {"ce", "teacher"}
    for entry in report["models"].values():
        assert len(entry["per_corruption"]["gaussian_noise"]) == 5
    assert report["models"]["ce"]["train_samples"] == 1347 // 128 * 128  # one epoch, 2 workers x 64
    rows = [json.loads(line) for line in (out / "local" / "ce" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]  # the job trained
    # the console: each logged step once, none of Ray Train's per-report lines (issue #13.4)
    steps = [line for line in done.stdout.splitlines() if "[local] epoch 1/1 step" in line]
    assert len(steps) == len(rows) and len(set(steps)) == len(steps), steps
    assert "Reporting training result" not in done.stdout and "Checkpoint successfully created" not in done.stdout
    assert "[WARNING] [lr_schedules" not in done.stdout  # DeepSpeed's own notices are off in the workers
    assert "built successfully" not in done.stdout  # nor its print as it builds its CPU collectives
    assert "Starting execution of Dataset" not in done.stdout  # nor Ray Data's lines at each dataset's start
    assert "No CUDA runtime is found" not in done.stdout  # nor torch's extension builder on CPU workers
    assert (out / "local" / "ce" / "model.safetensors").is_file()
    assert (out / "local" / "config.yaml").is_file()
