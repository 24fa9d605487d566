"""The RPT recipe: config errors before any work, and RPT with and without the feature cache through the
real pools (teacher pool actors + 2 DeepSpeed ZeRO-2 workers on a local Ray cluster)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from cluster.rpt_local import RPT_LOCAL_PRESET
from cluster.rpt_run import RptRecipeConfig, check_config, train_method
from robust.config import load_config


def _cfg(small_shards, tmp_path, *overrides: str) -> RptRecipeConfig:
    torch.manual_seed(0)
    large, teacher = tmp_path / "large.safetensors", tmp_path / "teacher.safetensors"
    save_file(timm.create_model("test_vit", num_classes=10, img_size=32).state_dict(), large)
    save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), teacher)
    return load_config(RptRecipeConfig, presets=[RPT_LOCAL_PRESET], overrides=[
        f"data.train_shards={small_shards['train']}", f"data.test_shards={small_shards['test']}",
        f"large.timm.checkpoint={large}", f"robust_teacher.checkpoint={teacher}", f"run.out_dir={tmp_path}",
        "optim.micro_batch_size=16", "run.epochs=1", "run.checkpoint_every=1000", "ray.check_resources=false",
        *overrides])


@pytest.mark.parametrize("override, message", [
    ("large.tune_fraction=1.5", "tune_fraction"),
    ("large.tune_from_block=99", "block"),
    ("select.passes=1", "passes"),
    ("robust_teacher.num_classes=7", "class counts differ"),
    ("run.methods=[rpt,wise_ft]", "add full_finetune"),
    ("run.methods=[rtp]", "must be a non-empty subset"),
])
def test_bad_configs_fail_before_any_work(small_shards, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        check_config(_cfg(small_shards, tmp_path, override))


@pytest.mark.parametrize("cache", [False, True])
def test_rpt_trains_only_the_tuned_part_through_the_pools(ray_local, small_shards, tmp_path, cache):
    cfg = _cfg(small_shards, tmp_path, f"run.feature_cache={str(cache).lower()}")
    counts = check_config(cfg)
    out = train_method(cfg, "rpt")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == (192 + 1) // 32 and all(r["loss"] == r["loss"] for r in rows)  # finite
    assert {"ce_clean", "kd_unclean", "ce_combined"} <= set(rows[-1])
    assert (tmp_path / cfg.run.name / "feature_cache").exists() == cache
    meta = json.loads((out / "model.json").read_text())
    assert meta["param_counts"] == counts and counts["tuned"] < counts["total"]
    # The frozen backbone left training bitwise unchanged: its weights equal the initial model's.
    trained, initial = load_file(out / "model.safetensors"), load_file(cfg.large.timm.checkpoint)
    frozen = {k: v for k, v in trained.items() if k.startswith("backbone.")}
    assert frozen
    assert all(any(torch.equal(v, w) for w in initial.values() if w.shape == v.shape) for v in frozen.values())
