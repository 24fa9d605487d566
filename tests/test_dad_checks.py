"""Bad input fails before any training starts, with a message that says what to change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import PoolsConfig, StudentPoolConfig, TeacherPoolConfig
from cluster.dad_run import DadRecipeConfig, check_config
from cluster.ray_init import begin_run, check_resources
from robust.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _cfg(shards, *overrides: str) -> DadRecipeConfig:
    return load_config(DadRecipeConfig, overrides=[f"data.train_shards={shards}", "student.num_classes=10",
                                                   "teacher.kind=timm", "teacher.timm.num_classes=10", *overrides])


def test_recipe_without_data_says_how_to_give_it():
    done = subprocess.run([sys.executable, str(REPO / "recipes" / "dad_imagenet.py"), "run.epochs=1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "data.train_shards=" in done.stderr and "preset=local" in done.stderr


def test_missing_shards_and_class_mismatch(small_shards, tmp_path):
    assert check_config(_cfg(small_shards["train"])) == 10
    with pytest.raises(ValueError, match="does not exist|no manifest"):
        check_config(_cfg(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="class counts differ: data 10, teacher 1000"):
        check_config(_cfg(small_shards["train"], "teacher.timm.num_classes=1000"))
    with pytest.raises(ValueError, match="run.methods"):
        check_config(_cfg(small_shards["train"], "run.methods=[dad,dat]"))


def test_impossible_pool_size_fails_before_training(ray_local):
    ok = PoolsConfig(TeacherPoolConfig(min_actors=2, max_actors=4, gpus_per_actor=0),
                     StudentPoolConfig(num_workers=2, gpus_per_worker=0))
    check_resources(ok)
    with pytest.raises(ValueError, match="student: need 3, cluster has 2"):
        check_resources(PoolsConfig(ok.teacher, StudentPoolConfig(num_workers=3, gpus_per_worker=0)))
    with pytest.raises(ValueError, match="GPU: need 2"):
        check_resources(PoolsConfig(TeacherPoolConfig(min_actors=2, gpus_per_actor=1), ok.student))


def test_bad_student_nice_fails_before_the_run_dir_exists(tmp_path):
    cfg = load_config(DadRecipeConfig, overrides=["pools.student.nice=20"])
    with pytest.raises(ValueError, match="pools.student.nice must be an os.nice increment in 0..19, got 20"):
        begin_run(cfg, tmp_path / "run", cfg.pools)
    assert not (tmp_path / "run").exists()
