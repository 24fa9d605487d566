"""Capacity planner: pool sizes, CPUs, network and hours of a DAD run, from measured costs (SPEC 9).

    robust-distill plan [key=value ...]        e.g. student_gpus=16 gpu=A100 top_k=10 mode=offline

Inputs: the measurements of ``python -m benchmarks.capacity`` (benchmarks/results/capacity.json: GFLOP per
224 px image of the real architectures, CPU ms per image of decode and augmentation, bytes per sample)
and a GPU's peak dense bf16 rate times an MFU per pool. Pure arithmetic; the formulas, their sources and
what they leave out: docs/capacity.md. ``plan_pools`` turns a plan into the pool overrides of
``robust-distill k8s render``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robust.config import load_config

# Dense bf16 tensor-core TFLOP/s from NVIDIA's datasheets (their headline figures assume 2:4 sparsity,
# twice these): H100 SXM5 and H200 SXM 1,979 sparse; A100 SXM 624 sparse; L40S 733 sparse.
GPU_PEAK_BF16_TFLOPS = {"H100-SXM": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
MEASURED = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "capacity.json"
MODES = ("online", "offline")
SHARD_IMAGES = ("png", "jpg")
VIEWS = 2  # a DAD sample is the clean and the DAD image: both are scored, sent and trained on


@dataclass
class PlanConfig:
    """One DAD run: its models, its GPUs and its data; MFU defaults stand until the GPU check measures them."""

    teacher: str = "ViT-L-14"  # open_clip arch, a key of the measured flops.teachers
    vqgan: str = "openimages_f8_16384"  # a VQGAN_PRESETS name, a key of flops.vqgans
    student: str = "vit_base_patch16_224"  # timm name, a key of flops.students
    gpu: str = "H100-SXM"  # a key of GPU_PEAK_BF16_TFLOPS
    student_gpus: int = 8
    dad_steps: int = 1
    mode: str = "online"  # the run plan_pools sizes the pools for
    top_k: int = 0  # teacher logits sent per view: 0 = all classes in fp16; k = top-k fp16 values + int16 indices
    offline_image: str = "png"  # image format of the offline shards: png (written today) | jpg
    offline_writers: int = 1  # processes encoding offline shards: 1 = the driver (write_offline) today
    images_per_epoch: int = 1_281_167  # ImageNet-1k train
    epochs: int = 30  # the official ViT-B/16 recipe
    mfu_teacher: float = 0.40  # default: bf16 VQGAN convolutions and ViT-L/14 at the pool's batch size
    mfu_student: float = 0.45  # default: ViT-B/16 training step under DeepSpeed bf16
    measured: str = str(MEASURED)  # capacity.json written by benchmarks/capacity.py


@dataclass(frozen=True)
class Plan:
    cfg: PlanConfig
    measured_on: str  # the benchmark's machine and date
    teacher_gflop: float  # per DAD sample on a teacher GPU
    student_gflop: float  # per sample on a student GPU
    teacher_rate: float  # samples/s per teacher GPU
    student_rate: float  # samples/s per student GPU
    teacher_gpus_exact: float  # teacher GPUs that keep student_gpus busy
    cpu_ms_teacher: float  # CPU ms per sample on the teacher pool: decode + augmentation
    cpu_ms_offline_read: float  # CPU ms per sample decoding an offline shard sample
    writer_rate: float  # samples/s the offline writers encode
    online_bytes: float  # object-store bytes per sample, teacher pool -> students
    offline_bytes: float  # shard bytes per sample read by the students
    terms: dict[str, float]  # the teacher_gflop terms, for the table

    @property
    def teacher_gpus(self) -> int:
        return max(1, math.ceil(self.teacher_gpus_exact - 1e-9))

    @property
    def cpus_per_teacher_gpu(self) -> float:
        return self.teacher_rate * self.cpu_ms_teacher / 1e3

    @property
    def cpus_per_student_gpu_offline(self) -> float:
        return self.student_rate * self.cpu_ms_offline_read / 1e3

    @property
    def online_bytes_per_s(self) -> float:  # per student GPU
        return self.student_rate * self.online_bytes

    @property
    def offline_bytes_per_s(self) -> float:  # per student GPU
        return self.student_rate * self.offline_bytes

    @property
    def epoch_hours(self) -> float:
        """Wall hours of one epoch with busy students; the same online and offline (teachers keep up)."""
        return self.cfg.images_per_epoch / (self.cfg.student_gpus * self.student_rate) / 3600

    @property
    def online_epoch_gpu_hours(self) -> float:
        return (self.cfg.student_gpus + self.teacher_gpus) * self.epoch_hours

    @property
    def offline_epoch_gpu_hours(self) -> float:
        return self.cfg.student_gpus * self.epoch_hours

    @property
    def generation_gpus(self) -> int:
        """Teacher GPUs of the offline generation: as many as the writers keep busy, at most teacher_gpus."""
        return min(self.teacher_gpus, max(1, math.ceil(self.writer_rate / self.teacher_rate - 1e-9)))

    @property
    def generation_hours(self) -> float:
        """Offline generation, at the slower of its teacher GPUs and the shard writers."""
        rate = min(self.generation_gpus * self.teacher_rate, self.writer_rate)
        return self.cfg.images_per_epoch / rate / 3600

    @property
    def generation_gpu_hours(self) -> float:
        return self.generation_gpus * self.generation_hours

    @property
    def break_even_epochs(self) -> float:
        """Epochs after which offline (generate once, then students only) has used fewer GPU-hours."""
        return self.generation_gpu_hours / (self.online_epoch_gpu_hours - self.offline_epoch_gpu_hours)


def load_measured(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"capacity measurements {str(path)!r} not found; pass measured=PATH to a capacity.json "
                         "(`python -m benchmarks.capacity` in the repository writes one)")
    return json.loads(path.read_text())


def _pick(table: dict[str, Any], key: str, what: str) -> Any:
    if key not in table:
        raise ValueError(f"{what} {key!r} is not measured; choose one of {sorted(table)} or add it to "
                         "benchmarks/capacity.py and re-run it")
    return table[key]


def _check(cfg: PlanConfig) -> None:
    if cfg.gpu not in GPU_PEAK_BF16_TFLOPS:
        raise ValueError(f"gpu {cfg.gpu!r} has no peak in GPU_PEAK_BF16_TFLOPS; choose one of "
                         f"{sorted(GPU_PEAK_BF16_TFLOPS)}")
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.offline_image not in SHARD_IMAGES:
        raise ValueError(f"offline_image must be one of {SHARD_IMAGES}, got {cfg.offline_image!r}")
    for name in ("student_gpus", "dad_steps", "offline_writers", "images_per_epoch", "epochs"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.top_k < 0:
        raise ValueError(f"top_k must be 0 (all logits) or a positive k, got {cfg.top_k}")
    for name in ("mfu_teacher", "mfu_student"):
        if not 0 < getattr(cfg, name) <= 1:
            raise ValueError(f"{name} must lie in (0, 1], got {getattr(cfg, name)}")


def make_plan(cfg: PlanConfig, measured: dict[str, Any]) -> Plan:
    """The plan of docs/capacity.md from ``cfg`` and a capacity.json's contents."""
    _check(cfg)
    peak = GPU_PEAK_BF16_TFLOPS[cfg.gpu] * 1e12
    flops = measured["flops"]
    teacher = _pick(flops["teachers"], cfg.teacher, "teacher")
    vqgan = _pick(flops["vqgans"], cfg.vqgan, "vqgan")
    student = _pick(flops["students"], cfg.student, "student")
    q = vqgan["encode"] + vqgan["decode"]
    # SPEC 4: x_dad = Q(PGD(Q(x))), each attack step a forward + input-gradient backward of the teacher,
    # then the teacher's soft targets on x and x_dad; the student trains on both views.
    terms = {"Q(x)": q, f"{cfg.dad_steps} attack step(s)": cfg.dad_steps * teacher["fwd_bwd_input"], "Q(x1)": q,
             f"teacher on {VIEWS} views": VIEWS * teacher["fwd"]}
    teacher_gflop, student_gflop = sum(terms.values()), VIEWS * student["fwd_bwd"]
    teacher_rate = peak * cfg.mfu_teacher / (teacher_gflop * 1e9)
    student_rate = peak * cfg.mfu_student / (student_gflop * 1e9)
    cpu = measured["cpu_ms"]
    # decode + crop + RandAugment once per source image; mixup/cutmix + erasing on the clean and the DAD view
    cpu_ms_teacher = cpu["decode"] + cpu["crop"] + cpu["randaugment"] + cpu["to_tensor"] + VIEWS * cpu["mix_erase"]
    logits = "full" if cfg.top_k == 0 else f"top{cfg.top_k}"
    store, shards = measured["bytes"]["object_store"], measured["bytes"]["offline_shard"][cfg.offline_image]
    if logits not in store or logits not in shards:
        raise ValueError(f"top_k={cfg.top_k} is not measured; run `python -m benchmarks.capacity --top-k "
                         f"{cfg.top_k}` or choose top_k from {sorted(k for k in store if k != 'full')}")
    machine = measured.get("machine", {})
    return Plan(cfg=cfg, measured_on=f"{machine.get('cpu', '?')}, {machine.get('date', '?')}",
                teacher_gflop=teacher_gflop, student_gflop=student_gflop, teacher_rate=teacher_rate,
                student_rate=student_rate, teacher_gpus_exact=cfg.student_gpus * student_rate / teacher_rate,
                cpu_ms_teacher=cpu_ms_teacher, cpu_ms_offline_read=VIEWS * cpu[f"{cfg.offline_image}_decode"],
                writer_rate=cfg.offline_writers * 1e3 / (VIEWS * cpu[f"{cfg.offline_image}_encode"]),
                online_bytes=store[logits]["measured"], offline_bytes=shards[logits], terms=terms)


def plan_pools(plan: Plan) -> list[str]:
    """``pools.*`` overrides of ``robust-distill k8s render`` (``load_deploy_config``) for the plan's mode.

    Online: exactly the teacher GPUs that keep the students busy. Offline: the generation's GPUs, scaling
    down to one teacher actor (the renderer's minimum) while the students train."""
    low, high = (plan.teacher_gpus,) * 2 if plan.cfg.mode == "online" else (1, plan.generation_gpus)
    return [f"pools.teacher.min_actors={low}", f"pools.teacher.max_actors={high}", "pools.teacher.gpus_per_actor=1",
            f"pools.teacher.cpus_per_actor={max(1, math.ceil(plan.cpus_per_teacher_gpu))}",
            f"pools.student.num_workers={plan.cfg.student_gpus}", "pools.student.gpus_per_worker=1"]


def _gpus(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def _rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e6:,.0f} MB/s ({bytes_per_s * 8 / 1e9:.1f} Gbit/s)"


def format_plan(plan: Plan) -> str:
    """The table ``robust-distill plan`` prints."""
    c, p = plan.cfg, plan
    terms = " + ".join(f"{name} {v:,.1f}" for name, v in p.terms.items())
    logits = "all logits" if c.top_k == 0 else f"top-{c.top_k} logits"
    rows = [
        ("teacher per sample", f"{p.teacher_gflop:,.1f} GFLOP = {terms}"),
        ("student per sample", f"{p.student_gflop:,.1f} GFLOP = {VIEWS} views x fwd+bwd"),
        ("samples/s per GPU", f"teacher {p.teacher_rate:,.1f}, student {p.student_rate:,.1f}"),
        ("teacher GPUs needed", f"{p.teacher_gpus} ({p.teacher_gpus_exact:.2f}; "
                                f"{p.teacher_gpus_exact / c.student_gpus:.2f} per student GPU)"),
        ("CPUs per teacher GPU", f"{p.cpus_per_teacher_gpu:.1f} (decode + augmentation {p.cpu_ms_teacher:.2f} ms "
                                 "per sample on one core)"),
        ("network / student GPU", f"online {_rate(p.online_bytes_per_s)} ({p.online_bytes / 1e3:,.1f} kB/sample, "
                                  f"{logits}); offline {_rate(p.offline_bytes_per_s)} of {c.offline_image} shards "
                                  f"({p.offline_bytes / 1e3:,.1f} kB/sample)"),
        ("CPUs per student GPU", f"offline {p.cpus_per_student_gpu_offline:.1f} (shard decode "
                                 f"{p.cpu_ms_offline_read:.2f} ms per sample); online: batches arrive decoded"),
        ("hours per epoch", f"online {p.epoch_hours:.3f} h on {c.student_gpus} + {p.teacher_gpus} GPUs "
                            f"({p.online_epoch_gpu_hours:.2f} GPU-h); offline {p.epoch_hours:.3f} h on "
                            f"{_gpus(c.student_gpus)} ({p.offline_epoch_gpu_hours:.2f} GPU-h)"),
        ("offline generation", f"{p.generation_hours:.3f} h on {_gpus(p.generation_gpus)} "
                               f"({p.generation_gpu_hours:.2f} GPU-h); {c.offline_writers} shard writer(s) "
                               f"encode {p.writer_rate:,.0f} samples/s"),
        (f"{c.epochs} epochs", f"online {c.epochs * p.online_epoch_gpu_hours:,.1f} GPU-h in "
                               f"{c.epochs * p.epoch_hours:.2f} h; offline "
                               f"{p.generation_gpu_hours + c.epochs * p.offline_epoch_gpu_hours:,.1f} GPU-h in "
                               f"{p.generation_hours + c.epochs * p.epoch_hours:.2f} h"),
        ("offline break-even", f"{p.break_even_epochs:.2f} epochs (GPU-hours)"),
    ]
    head = (f"DAD capacity plan: CLIP {c.teacher} + VQGAN {c.vqgan} -> {c.student}, {c.student_gpus} x {c.gpu} "
            f"students, {c.images_per_epoch:,} images/epoch\n"
            f"{GPU_PEAK_BF16_TFLOPS[c.gpu]:g} TFLOP/s bf16 peak x MFU teacher {c.mfu_teacher:g} / student "
            f"{c.mfu_student:g}; measured costs from {c.measured} ({plan.measured_on})")
    width = max(len(name) for name, _ in rows)
    render = f"robust-distill k8s render --overlay gpu-cluster --out DIR {' '.join(plan_pools(plan))}"
    return "\n".join([head, "", *(f"{name:<{width}}  {value}" for name, value in rows), "",
                      f"pools ({c.mode}): {render}"])


def _plan_command(args: argparse.Namespace) -> None:
    cfg = load_config(PlanConfig, overrides=args.overrides)
    print(format_plan(make_plan(cfg, load_measured(cfg.measured))))


def add_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``plan`` to the ``robust-distill`` command (its ``func`` prints the table; ValueError on bad input)."""
    p = subparsers.add_parser("plan", help="teacher GPUs, CPUs, network and hours of a DAD run from measured costs",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="PlanConfig dotlist, e.g. student_gpus=16 gpu=A100 top_k=10")
    p.set_defaults(func=_plan_command)
    return p
