"""The robust-teacher job on the real pools: DeepAugment copies generated once by the teacher pool (as many
as train.deepaugment.copies asks), then AugMix + PixMix views made by 2 DeepSpeed workers on the originals
and the copies; the export is timm's own folder."""

from __future__ import annotations

import json

import timm
import torch

from cluster.engine.streams import count_samples
from cluster.jobs.robust_teacher import RobustTeacherJobConfig, run
from cluster.jobs.robust_teacher_local import OVERLAY
from robust.config import load_config
from tests.conftest import N_SMALL


def test_teacher_trains_on_originals_and_deepaugment_copies(ray_cluster, small_shards, tmp_path):
    cfg = load_config(RobustTeacherJobConfig, presets=[OVERLAY], overrides=[
        f"data.train_shards={small_shards['train']}", f"run.out_dir={tmp_path}", "run.epochs=1",
        "deepaugment_fit_images=64", "train.deepaugment.train_steps=5", "train.deepaugment.copies=2",
        "optim.micro_batch_size=16", "train.pixmix.mixing.num_images=8", "ray.check_resources=false",
        "train.augmentations=[augmix,deepaugment,pixmix]"])
    run(cfg)
    out = tmp_path / cfg.run.name
    copies = out / "deepaugment"
    assert count_samples(str(copies)) == 2 * N_SMALL  # every decodable training image, once per copy
    rows = [json.loads(line) for line in (out / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == (3 * N_SMALL + 1) // 32  # originals + 2 copies, 2 workers x 16
    assert sum(r["skipped"] for r in rows) == 1 and any("corrupt" in k for r in rows for k in r["skipped_keys"])
    assert rows[-1]["loss"] < rows[0]["loss"]
    model = timm.create_model(f"local-dir:{out / 'teacher'}", pretrained=True)  # plain timm rebuilds the export
    assert model.num_classes == 10 and torch.isfinite(model(torch.rand(2, 3, 32, 32))).all()
