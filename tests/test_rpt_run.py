"""The RPT job through the real pools: the partially tuned methods train together on the feature cache,
full fine-tuning on images, WiSE-FT interpolates it; and the teachers are the paper's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from cluster.engine import batch as B
from cluster.jobs.rpt import RptConfig, RptProducer, check, run
from cluster.jobs.rpt_local import OVERLAY, RptLocalConfig
from robust.config import load_config
from robust.models.clip_teacher import ClipTeacherConfig, build_clip_teacher
from robust.models.timm_models import TimmConfig
from robust.rpt.baselines import build_method
from robust.rpt.partial import PartialConfig


def _cfg(small_shards, tmp_path, *overrides: str) -> RptConfig:
    torch.manual_seed(0)
    large, teacher = tmp_path / "large.safetensors", tmp_path / "teacher.safetensors"
    save_file(timm.create_model("test_vit", num_classes=10, img_size=32).state_dict(), large)
    save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), teacher)
    return load_config(RptConfig, presets=[OVERLAY], overrides=[
        f"data.train_shards={small_shards['train']}", f"data.test_shards={small_shards['test']}",
        "large.timm.name=test_vit", "large.timm.img_size=32", "large.tune_from_block=4", "robust_teacher.name=test_resnet",
        f"large.timm.checkpoint={large}", f"robust_teacher.checkpoint={teacher}", f"run.out_dir={tmp_path}",
        "optim.micro_batch_size=16", "run.epochs=1", "run.checkpoint_every=1000", "ray.check_resources=false",
        "run.cache_copies=2", "augmented.deepaugment.train_steps=20",
        "eval.corruptions=[gaussian_noise]", "eval.severities=[3]", *overrides])


def test_rpt_and_full_finetuning_train_their_parts_and_wise_ft_interpolates(ray_cluster, small_shards, tmp_path):
    cfg = _cfg(small_shards, tmp_path, "run.methods=[rpt,apt,full_finetune,wise_ft]", "run.wise_alphas=[0.5]")
    counts = check(cfg)
    report = run(cfg)
    out = tmp_path / cfg.run.name
    assert set(report["models"]) == {"rpt", "apt", "full_finetune", "wise_ft_0.5"}
    assert len(list((out / "feature_cache").iterdir())) == 1  # the partially tuned methods share one cache
    rows = [json.loads(line) for line in (out / "rpt" / "metrics.jsonl").read_text().splitlines()]
    # an epoch: the 192 clean samples and half (augmented.fraction) of their AugMix and DeepAugment candidates
    assert rows[-1]["step"] == (192 + 192) // 32 and {"ce_clean", "kd_unclean", "ce_combined"} <= set(rows[-1])
    assert np.isfinite([r["loss"] for r in rows]).all() and rows[-1]["loss"] < rows[0]["loss"]
    meta = json.loads((out / "rpt" / "model.json").read_text())
    assert meta["param_counts"] == counts and counts["tuned"] < counts["total"]
    # The frozen backbone left training bitwise unchanged: each of its weights is the initial model's, key by key.
    trained, initial = load_file(out / "rpt" / "model.safetensors"), load_file(cfg.large.timm.checkpoint)
    frozen = {k.removeprefix("backbone.trunk.model."): v for k, v in trained.items() if k.startswith("backbone.")}
    assert frozen and all(torch.equal(v, initial[k]) for k, v in frozen.items())
    tuned = {k for k in trained if k.startswith("tuned.")}
    assert tuned and "tuned.heads.clean.shell.head.weight" in tuned
    # WiSE-FT at 0.5: the mean of the initial and the fine-tuned weights, costing what fine-tuning cost
    ft, wise = load_file(out / "full_finetune" / "model.safetensors"), load_file(out / "wise_ft_0.5" / "model.safetensors")
    key = "tuned.heads.combined.head.weight"
    torch.testing.assert_close(wise[key], (ft[key] + initial["head.weight"]) / 2)
    assert report["models"]["wise_ft_0.5"]["train_s"] == report["models"]["full_finetune"]["train_s"]
    # F_correct over the clean test set and its one corrupted copy (same size): the mean of the two sets'
    # routing, where clean samples count for the clean head and corrupted ones for the unclean head
    f = report["models"]["rpt"]["f_correct"]
    assert set(f) == {"clean", "('gaussian_noise', 3)"}
    assert report["models"]["rpt"]["f_correct_overall"] == pytest.approx((f["clean"] + f["('gaussian_noise', 3)"]) / 2)


def test_the_zero_shot_clean_head_teacher_is_the_initial_clip_model(tiny_clip, tmp_path):
    # RPT's teacher of clean samples is a frozen copy of the initial large model (eq. 3): in the zero-shot
    # setting the initial open_clip classifier, not a timm model (the job passed large.timm before).
    clip = ClipTeacherConfig(arch=tiny_clip, pretrained="", class_names=[f"digit {i}" for i in range(10)],
                             templates=["a photo of the number {}."], cache_dir=str(tmp_path / "clip"))
    large = PartialConfig(source="open_clip", clip=clip, tune_fraction=0.3)
    producer = RptProducer(large, TimmConfig(name="test_resnet", num_classes=10), "rpt", features=False, precision="fp32")
    models = producer.build(torch.device("cpu"))
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    out = producer.produce(models, {B.IMAGE: x, B.AUGMENTED: np.zeros(4, dtype=bool)}, device=torch.device("cpu"))
    with torch.no_grad():
        expected = build_clip_teacher(clip)(B.images(x, "cpu"))
    torch.testing.assert_close(out["teacher_logits"], expected)


def test_the_local_preset_tunes_the_last_stage_of_a_large_model_larger_than_its_teacher():
    cfg = load_config(RptLocalConfig, presets=[OVERLAY])
    resnet = timm.create_model(cfg.large.timm.name, num_classes=10)
    head = sum(p.numel() for p in resnet.fc.parameters())
    tuned = sum(p.numel() for p in resnet.layer4.parameters()) + 3 * head  # layer4, and a classifier per head
    assert build_method("rpt", cfg.large).param_counts() == {"tuned": tuned, "total": sum(
        p.numel() for p in resnet.parameters()) + 2 * head}
    teacher = timm.create_model(cfg.robust_teacher.name, num_classes=10)
    assert sum(p.numel() for p in teacher.parameters()) * 3 < sum(p.numel() for p in resnet.parameters())
