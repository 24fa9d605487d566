"""The robust-teacher recipe on the real pools: DeepAugment shards generated once by the teacher pool,
then AugMix + PixMix views made by 2 DeepSpeed workers on the original and DeepAugment samples."""

from __future__ import annotations

import json

import pytest
import timm
from safetensors.torch import load_file

from cluster.pipeline import count_samples
from cluster.teacher_run import TEACHER_LOCAL_PRESET, RobustTeacherRecipeConfig, check_config, run
from robust.config import load_config
from tests.conftest import N_SMALL


def _cfg(small_shards, tmp_path, *overrides: str) -> RobustTeacherRecipeConfig:
    return load_config(RobustTeacherRecipeConfig, presets=[TEACHER_LOCAL_PRESET], overrides=[
        f"data.train_shards={small_shards['train']}", f"run.out_dir={tmp_path}", "run.epochs=1",
        "run.deepaugment_fit_images=64", "train.deepaugment.train_steps=5", "optim.micro_batch_size=16",
        "train.pixmix.mixing.num_images=8", "ray.check_resources=false", *overrides])


def test_unknown_augmentation_fails_before_any_work(small_shards, tmp_path):
    with pytest.raises(ValueError, match="augmentations"):
        check_config(_cfg(small_shards, tmp_path, "train.augmentations=[augmix,cutout]"))


def test_teacher_trains_on_originals_and_deepaugment_copies(ray_local, small_shards, tmp_path):
    cfg = _cfg(small_shards, tmp_path, "train.augmentations=[augmix,deepaugment,pixmix]")
    run(cfg)
    out = tmp_path / cfg.run.name
    assert count_samples(str(out / "deepaugment")) == N_SMALL  # every decodable training image, once
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == (2 * N_SMALL + 1) // 32 and all(r["loss"] == r["loss"] for r in rows)
    model = timm.create_model("test_resnet", num_classes=10)
    model.load_state_dict(load_file(out / "teacher.safetensors"))  # plain timm rebuilds the export
    assert json.loads((out / "teacher.json").read_text())["num_classes"] == 10
