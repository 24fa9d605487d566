"""Capacity planner: its arithmetic against a hand computation, the CLI table, the committed measurements
against SPEC 9, and pool overrides the KubeRay renderer accepts."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from cluster.deploy.k8s import build_objects, load_deploy_config
from cluster.deploy.k8s_checks import check_manifests
from cluster.cli import main
from cluster.deploy.plan import MEASURED, PlanConfig, load_measured, make_plan, plan_pools

# A made-up measurement: GFLOP per image, CPU ms per image, bytes per sample.
TOY = {
    "machine": {"cpu": "toy", "date": "today"},
    "flops": {"teachers": {"T": {"fwd": 10.0, "fwd_bwd_input": 20.0}}, "vqgans": {"V": {"encode": 3.0, "decode": 7.0}},
              "students": {"S": {"fwd_bwd": 5.0}}},
    "cpu_ms": {"decode": 1.0, "crop": 2.0, "randaugment": 3.0, "to_tensor": 0.5, "mix_erase": 0.3,
               "png_encode": 4.0, "png_decode": 2.0, "jpg_encode": 1.0, "jpg_decode": 0.5},
    "bytes": {"object_store": {"full": {"measured": 1000.0}, "top5": {"measured": 600.0}},
              "offline_shard": {"png": {"full": 500.0, "top5": 400.0}, "jpg": {"full": 100.0, "top5": 50.0}}},
}
# A100: 312 TFLOP/s. Student 2 views x 5 = 10 GFLOP at 0.25 -> 7800 samples/s; 3 of them, 0.01 h per epoch.
TOY_CFG = dict(teacher="T", vqgan="V", student="S", gpu="A100", student_gpus=3, dad_steps=2, mfu_teacher=0.5,
               mfu_student=0.25, images_per_epoch=3 * 7800 * 36, epochs=10)


def test_plan_matches_a_hand_computation():
    p = make_plan(PlanConfig(**TOY_CFG), TOY)
    assert p.teacher_gflop == 10 + 2 * 20 + 10 + 2 * 10  # Q(x) + 2 attack steps + Q(x1) + teacher on 2 views
    assert p.student_gflop == 2 * 5
    assert p.teacher_rate == pytest.approx(312e12 * 0.5 / 80e9)  # 1950 samples/s
    assert p.student_rate == pytest.approx(7800)
    assert (p.teacher_gpus_exact, p.teacher_gpus) == (pytest.approx(12.0), 12)  # 3 x 7800 / 1950, no spurious +1
    assert p.cpu_ms_teacher == pytest.approx(1 + 2 + 3 + 0.5 + 2 * 0.3)
    assert p.cpus_per_teacher_gpu == pytest.approx(1950 * 7.1 / 1e3)
    assert p.online_bytes_per_s == pytest.approx(7800 * 1000)
    assert p.offline_bytes_per_s == pytest.approx(7800 * 500)
    assert p.cpus_per_student_gpu_offline == pytest.approx(7800 * 2 * 2.0 / 1e3)
    assert p.epoch_hours == pytest.approx(0.01)
    assert (p.online_epoch_gpu_hours, p.offline_epoch_gpu_hours) == (pytest.approx(0.15), pytest.approx(0.03))
    # One writer encodes 1000 / (2 x 4 ms) = 125 samples/s: one teacher GPU is plenty.
    assert (p.writer_rate, p.generation_gpus) == (pytest.approx(125), 1)
    assert p.generation_hours == pytest.approx(842_400 / 125 / 3600)
    assert p.break_even_epochs == pytest.approx(1.872 / (0.15 - 0.03))


def test_more_writers_use_more_generation_gpus_and_move_the_break_even():
    p = make_plan(PlanConfig(**TOY_CFG, offline_writers=100), TOY)
    assert p.generation_gpus == 7  # ceil(12500 / 1950)
    assert p.generation_hours == pytest.approx(842_400 / 12_500 / 3600)  # the writers are still the slower side
    assert p.break_even_epochs == pytest.approx(7 * 0.01872 / 0.12)


def test_top_k_and_jpeg_shards_pick_their_measurements():
    p = make_plan(PlanConfig(**TOY_CFG, top_k=5, offline_image="jpg"), TOY)
    assert (p.online_bytes, p.offline_bytes, p.cpu_ms_offline_read, p.writer_rate) == (600.0, 50.0, 1.0, 500.0)


def test_a_fractional_teacher_need_rounds_up():
    p = make_plan(PlanConfig(**{**TOY_CFG, "student_gpus": 2, "mfu_teacher": 0.3}), TOY)
    assert p.teacher_gpus_exact == pytest.approx(2 * 7800 / (312e12 * 0.3 / 80e9))  # 13.33
    assert p.teacher_gpus == 14


def _run_cli(argv, capsys):
    code = main(["plan", *argv])
    out = capsys.readouterr()
    if code:
        raise ValueError(out.err)
    return out.out


def test_cli_prints_the_table(tmp_path, capsys):
    path = tmp_path / "capacity.json"
    path.write_text(json.dumps(TOY))
    overrides = [f"{k}={v}" for k, v in TOY_CFG.items()]
    out = _run_cli([*overrides, f"measured={path}"], capsys)
    assert "teacher GPUs needed    12 (12.00; 4.00 per student GPU)" in out
    assert "CPUs per teacher GPU   13.8 (decode + augmentation 7.10 ms" in out
    assert "pools.teacher.min_actors=12 pools.teacher.max_actors=12" in out
    assert "pools.teacher.cpus_per_actor=14" in out and "pools.student.num_workers=3" in out


def test_cli_without_arguments_plans_the_spec_imagenet_setting(capsys):
    out = _run_cli([], capsys)
    assert "CLIP ViT-L-14 + VQGAN openimages_f8_16384 -> vit_base_patch16_224, 8 x H100-SXM" in out
    plan = make_plan(PlanConfig(), load_measured(MEASURED))
    assert f"teacher GPUs needed    {plan.teacher_gpus} (" in out
    # SPEC 9: the teacher side is 8-9x the student side in FLOPs; at MFU 0.40 / 0.45, 9-10 GPUs per student GPU.
    assert 8 < plan.teacher_gflop / plan.student_gflop < 9
    assert 9 * 8 < plan.teacher_gpus_exact < 10 * 8


def test_committed_flops_are_spec_9_plus_the_attention_it_did_not_count():
    """SPEC 9 counted with the CPU flash-attention kernel, which has no FLOP formula; the benchmark counts
    the attention matmuls (QK^T and AV: 2 x 2 x L x N^2 x D per forward, twice that in a backward)."""
    flops, spec = load_measured(MEASURED)["flops"], load_measured(MEASURED)["flops"]["spec"]

    def attention(layers, tokens, width):
        return 2 * 2 * layers * tokens**2 * width / 1e9

    vit_l, vit_b = attention(24, 257, 1024), attention(12, 197, 768)
    assert flops["teachers"]["ViT-L-14"]["fwd"] == pytest.approx(spec["ViT-L-14"]["fwd"] + vit_l, abs=0.1)
    assert flops["teachers"]["ViT-B-16"]["fwd"] == pytest.approx(spec["ViT-B-16"]["fwd"] + vit_b, abs=0.1)
    student = flops["students"]["vit_base_patch16_224"]["fwd_bwd"]
    assert student == pytest.approx(spec["vit_base_patch16_224"]["fwd_bwd"] + 3 * vit_b, abs=0.1)
    assert flops["students"]["resnet50"]["fwd_bwd"] == pytest.approx(spec["resnet50"]["fwd_bwd"], abs=0.05)
    for preset in ("openimages_f8_16384", "imagenet_f16_1024"):
        for part in ("encode", "decode"):
            assert flops["vqgans"][preset][part] == pytest.approx(spec[preset][part], abs=0.5)


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_plan_pools_render_on_the_gpu_cluster_overlay(mode):
    plan = make_plan(PlanConfig(mode=mode), load_measured(MEASURED))
    cfg = load_deploy_config("gpu-cluster", plan_pools(plan))
    t, s = cfg.pools.teacher, cfg.pools.student
    expected = (plan.teacher_gpus, plan.teacher_gpus) if mode == "online" else (1, plan.generation_gpus)
    assert (t.min_actors, t.max_actors, t.gpus_per_actor) == (*expected, 1)
    assert t.cpus_per_actor >= plan.cpus_per_teacher_gpu > t.cpus_per_actor - 1
    assert (s.num_workers, s.gpus_per_worker) == (8, 1)
    check_manifests(build_objects(cfg.pools, cfg.k8s), pools=cfg.pools)  # what `k8s render` checks before writing


@pytest.mark.parametrize("override, message", [
    ("teacher=ViT-H-14", "teacher 'ViT-H-14' is not measured"),
    ("gpu=V100", "gpu 'V100' has no peak in GPU_PEAK_BF16_TFLOPS"),
    ("top_k=7", "top_k=7 is not measured"),
    ("mode=both", "mode must be one of"),
    ("student_gpus=0", "student_gpus must be >= 1"),
    ("mfu_teacher=1.5", "mfu_teacher must lie in (0, 1]"),
    ("measured=/nonexistent/capacity.json", "not found; pass measured=PATH"),
])
def test_bad_settings_say_what_to_do(override, message, capsys):
    with pytest.raises(ValueError, match=re.escape(message)):
        _run_cli([override], capsys)


def test_the_planner_imports_neither_ray_nor_torch():
    check = ("import sys; import cluster.deploy.plan as p; p.make_plan(p.PlanConfig(), p.load_measured(p.MEASURED)); "
             "print(sorted(m for m in ('ray', 'torch', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
