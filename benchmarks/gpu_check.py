"""The GPU check (issue #15 item 4): what one GPU does with the project's real architectures, in one run.

    bash benchmarks/gpu_check.sh [--out DIR]     # on a CUDA machine: < 8 minutes on one H100/H200
    bash benchmarks/gpu_check.sh --smoke         # tiny models on the CPU: checks the script itself (CI)

Measures, writing ``gpu_check.json`` (machine described):
  teacher   DAD samples/s of the teacher pool's GPU work (``robust.distill.teacher_targets``: Q(x), one
            input-gradient attack step on the teacher, Q(x1), the teacher on x and x_dad) with CLIP ViT-B/16
            and the VQGAN f8-16384 (random weights, real architectures) in bf16 autocast, channels-last,
            at each batch size of a sweep; MFU from the FLOP counts of benchmarks/results/capacity.json
  student   images/s of a ViT-B/16 DeepSpeed ZeRO-2 bf16 training step (AdamW) on the clean and the DAD
            image of each sample; its MFU
  ratio     teacher GPUs per student GPU that keep the student busy (student rate / teacher rate)
  tests     the CUDA-only tests (pytest -m cuda), and their outcome
Targets on H100/H200: teacher >= 40% MFU, student >= 45% MFU (the planner's defaults until this runs).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import machine, save_result  # noqa: E402
from cluster.deploy.plan import GPU_PEAK_BF16_TFLOPS  # noqa: E402
from robust.attacks.dad import DADConfig  # noqa: E402
from robust.distill import teacher_targets  # noqa: E402
from robust.models.clip_teacher import ClipTeacher  # noqa: E402
from robust.models.vqgan import VQGAN_PRESETS, VQGANConfig, build_vqgan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CAPACITY = REPO / "benchmarks" / "results" / "capacity.json"
TARGETS = {"teacher_mfu": 0.40, "student_mfu": 0.45}


def _clip_teacher(arch: str, classes: int, device: torch.device) -> ClipTeacher:
    """A CLIP zero-shot teacher of real architecture, random weights, random class embeddings (their values
    do not change the cost)."""
    import open_clip

    clip = open_clip.create_model(arch, pretrained=None, device=device)
    embed = clip.text_projection.shape[1] if getattr(clip, "text_projection", None) is not None else clip.visual.output_dim
    classes_DK = torch.nn.functional.normalize(torch.randn(embed, classes, device=device), dim=0)
    return ClipTeacher(clip, classes_DK).to(device)


def _timed(fn, *, warmup: int, repeats: int, device: torch.device) -> float:
    """Seconds per call, after warm-up (cuDNN autotuning, compilation), synchronised on CUDA."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def teacher_sweep(args, device: torch.device, flops: dict) -> list[dict]:
    if args.smoke:
        teacher = _clip_teacher(args.clip_arch, 10, device)
        vqgan = build_vqgan(VQGANConfig(**VQGAN_PRESETS["digits32_f4_128"]), device=device)
    else:
        teacher = _clip_teacher(args.clip_arch, 1000, device)
        vqgan = build_vqgan(VQGANConfig(), device=device)  # the OpenImages f8-16384 architecture
    precision, size = ("fp32" if device.type == "cpu" else "bf16"), args.image_size
    per_sample = flops["per_dad_sample_gflop"] * 1e9
    rows = []
    for batch in args.teacher_batches:
        x = torch.rand(batch, 3, size, size, device=device)
        y = torch.randint(0, 10 if args.smoke else 1000, (batch,), device=device)
        call = functools.partial(teacher_targets, teacher, x, y, precision=precision, vqgan=vqgan, dad=DADConfig())
        seconds = _timed(call, warmup=args.warmup, repeats=args.repeats, device=device)
        rate = batch / seconds
        rows.append({"batch": batch, "samples_per_s": rate, "tflops": rate * per_sample / 1e12,
                     "mfu": rate * per_sample / args.peak_flops if args.peak_flops else None})
        print(f"teacher batch {batch}: {rate:.1f} DAD samples/s", flush=True)
    return rows


def student_rate(args, device: torch.device, flops: dict) -> dict:
    """A ViT-B/16 DeepSpeed ZeRO-2 step in bf16 on one GPU (world size 1) on 2 x batch images."""
    import deepspeed
    import timm

    for var, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29512"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                       ("WORLD_SIZE", "1")):  # one process, the group DeepSpeed expects
        os.environ.setdefault(var, value)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    name = "test_vit" if args.smoke else "vit_base_patch16_224"
    model = timm.create_model(name, num_classes=10 if args.smoke else 1000, img_size=args.image_size)
    cfg = {"train_micro_batch_size_per_gpu": 2 * args.student_batch, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 2}, "bf16": {"enabled": device.type == "cuda"},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters(),
                                      dist_init_required=False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.rand(2 * args.student_batch, 3, args.image_size, args.image_size, device=engine.device, dtype=dtype)
    y = torch.randint(0, 10 if args.smoke else 1000, (2 * args.student_batch,), device=engine.device)

    def step():
        loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
        engine.backward(loss)
        engine.step()

    seconds = _timed(step, warmup=args.warmup, repeats=args.repeats, device=device)
    per_image = flops["student_fwd_bwd_gflop"] * 1e9
    images = 2 * args.student_batch / seconds
    return {"batch": 2 * args.student_batch, "images_per_s": images, "samples_per_s": images / 2,
            "tflops": images * per_image / 1e12, "mfu": images * per_image / args.peak_flops if args.peak_flops else None}


def cuda_tests() -> dict:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"], cwd=REPO,
                          capture_output=True, text=True)
    return {"returncode": done.returncode, "summary": done.stdout.strip().splitlines()[-1:]}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny models on whatever device: checks the script")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder of gpu_check.json")
    p.add_argument("--gpu", default="H100-SXM", help=f"peak bf16 TFLOP/s from {sorted(GPU_PEAK_BF16_TFLOPS)}")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.clip_arch, args.image_size, args.teacher_batches, args.student_batch = "ViT-B-32", 32, [2, 4], 2
        args.warmup, args.repeats = 1, 2
    else:
        if device.type != "cuda":
            raise SystemExit("the GPU check needs a CUDA device; on the CPU run it with --smoke")
        args.clip_arch, args.image_size, args.teacher_batches, args.student_batch = "ViT-B-16", 224, [32, 64, 128], 64
        args.warmup, args.repeats = 3, 10
    args.peak_flops = GPU_PEAK_BF16_TFLOPS[args.gpu] * 1e12 if device.type == "cuda" else None
    measured = json.loads(CAPACITY.read_text())["flops"]
    vq, clip = measured["vqgans"]["openimages_f8_16384"], measured["teachers"]["ViT-B-16"]
    flops = {"per_dad_sample_gflop": 2 * (vq["encode"] + vq["decode"]) + clip["fwd_bwd_input"] + 2 * clip["fwd"],
             "student_fwd_bwd_gflop": measured["students"]["vit_base_patch16_224"]["fwd_bwd"]}
    t0 = time.perf_counter()
    teacher = teacher_sweep(args, device, flops)
    student = student_rate(args, device, flops)
    best = max(teacher, key=lambda r: r["samples_per_s"])
    result = {"machine": machine(), "device": str(device), "smoke": args.smoke, "gpu_peak": args.gpu,
              "flops": flops, "teacher": teacher, "student": student,
              "teacher_gpus_per_student_gpu": student["samples_per_s"] / best["samples_per_s"],
              "tests": cuda_tests() if device.type == "cuda" else None, "targets": TARGETS,
              "seconds": time.perf_counter() - t0}
    save_result(Path(args.out) / ("gpu_check_smoke.json" if args.smoke else "gpu_check.json"), result)


if __name__ == "__main__":
    main(sys.argv[1:])
