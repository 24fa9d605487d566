"""The one-command GPU check runs its CPU-possible parts here (tiny models, --smoke) and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_script_measures_the_teacher_and_the_student(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_PORT": "29631"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check_smoke.json").read_text())
    assert result["smoke"] and result["device"] == "cpu" and result["machine"]["cores"] >= 1
    assert [r["batch"] for r in result["teacher"]] == [2, 4] and all(r["samples_per_s"] > 0 for r in result["teacher"])
    assert result["student"]["images_per_s"] == 2 * result["student"]["samples_per_s"] > 0
    # the ratio is the student's DAD samples per second over the best teacher batch's
    best = max(r["samples_per_s"] for r in result["teacher"])
    assert result["teacher_gpus_per_student_gpu"] == result["student"]["samples_per_s"] / best
    # per DAD sample: two VQGAN round trips, one input-gradient step and two forwards of CLIP ViT-B/16
    assert 1200 < result["flops"]["per_dad_sample_gflop"] < 1210
