"""Measured inputs of the capacity planner (``robust-distill plan``, cluster/deploy/plan.py) at 224 px.

Run from the repository root:  .venv/bin/python -m benchmarks.capacity     (~3 min, 1 thread)
Writes benchmarks/results/capacity.json:

* ``flops``: GFLOP per image from ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add) on
  the real architectures at random weights, batch 1. Teachers (the project's ``ClipTeacher`` around
  open_clip's tower, random class embeddings): forward, and forward + backward w.r.t. the INPUT only (the
  DAD attack step: frozen parameters); ``fwd_bwd_params`` (parameter gradients too) only to compare with
  SPEC 9. VQGAN presets: ``encode`` (encoder + code search) and ``decode``. Students (timm): forward, and
  forward + backward with parameter gradients. Attention is counted: SDPA runs on its math backend
  (the CPU flash kernel has no FLOP formula) and ``nn.MultiheadAttention``'s fused inference path is off.
* ``cpu_ms``: CPU milliseconds per image on one core (the process's CPU time, one thread), from a JPEG
  shard set of photos at ImageNet's typical size (500x375, quality 90, written with ``robust.data.shards``):
  ``decode`` (``decode_image``), the paper recipe's per-image augmentation in timm's three stages
  (``crop``: RandomResizedCrop 224 bicubic + flip; ``randaugment``: ``rand-m9-mstd0.5-inc1``, magnitudes
  clipped at 9 (see RANDAUGMENT), colour jitter 0.4 which timm, like the official runs, skips under
  RandAugment; ``to_tensor``: uint8 CHW) and, per image of a batch, ``mix_erase``: timm's ``Mixup``
  (mixup 0.8, cutmix 1.0, label smoothing 0.1) and ``RandomErasing`` 0.25. Offline shard costs per image:
  ``{png,jpg}_{encode,decode}`` of a 224 px crop (PNG at compress_level 1 as the DAD shards are written;
  JPEG quality 90).
* ``bytes``: per sample. ``object_store``: the teacher pool's output batch (uint8 images, fp16 logits for
  the clean and the DAD view, key, label, epoch, valid, pid; what ``decode_offline`` also emits) as Ray
  Data sizes its Arrow block (``measured``) and as the sum of the numpy arrays (``computed``), with full
  logits or top-k (fp16 values + int16 indices). ``offline_shard``: tar bytes per sample of real shards
  (clean + DAD image, both logits, label) with PNG or JPEG images, full or top-k logits; the DAD image
  stored is a second crop of the same photo.

The photos are smoother than ImageNet's (their JPEGs average ~46 kB, an ImageNet training image ~110 kB),
so JPEG decode times and PNG/JPEG sizes here are likely low.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import skimage.data
import timm.data
import torch
import webdataset as wds
from PIL import Image
from ray.data.block import BlockAccessor
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.machine import machine, save_result
from robust.config import load_config
from robust.data.images import decode_image
from robust.data.shards import encode_png, make_sample, write_shards
from robust.models.clip_teacher import ClipTeacher
from robust.models.timm_models import TimmConfig, build_timm
from robust.models.vqgan import VQGAN_PRESETS, VQGANConfig, build_vqgan

RESULTS = Path(__file__).parent / "results" / "capacity.json"
SIZE, NUM_CLASSES = 224, 1000
TEACHERS = ("ViT-L-14", "ViT-B-16")  # open_clip archs
VQGANS = ("openimages_f8_16384", "imagenet_f16_1024", "imagenet_f16_16384")
STUDENTS = ("vit_base_patch16_224", "resnet50")  # timm names
SPEC = {"source": "SPEC section 9 (GFLOP per 224 px image)", "ViT-L-14": {"fwd": 155.5, "fwd_bwd_params": 466.6},
        "ViT-B-16": {"fwd": 33.7}, "vit_base_patch16_224": {"fwd_bwd": 100.9}, "resnet50": {"fwd_bwd": 24.3},
        "openimages_f8_16384": {"encode": 172, "decode": 360}, "imagenet_f16_1024": {"encode": 106, "decode": 193}}
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
SOURCE_HW = (375, 500)  # ImageNet's most common size; every other photo is portrait (500x375)
IMAGENET_KEY = "n01440764_10026"  # the key length of an ImageNet training image
# The recipe's rand-m9-mstd0.5-inc1, with magnitudes clipped at 9 instead of 10: at level 10 timm's
# PosterizeIncreasing keeps 0 bits, which Pillow 13 rejects (ValueError): 0.18% of images (timm 1.0.31).
RANDAUGMENT = "rand-m9-mstd0.5-inc1-mmax9"


# ---------------------------------------------------------------- FLOPs


def gflops(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops() / 1e9


def teacher_flops(arch: str) -> dict[str, float]:
    clip = open_clip.create_model(arch, pretrained=None)
    embeddings_DK = F.normalize(torch.randn(clip.visual.output_dim, NUM_CLASSES), dim=0)
    teacher = ClipTeacher(clip, embeddings_DK)
    x, y = torch.rand(1, 3, SIZE, SIZE), torch.tensor([0])
    with torch.no_grad():
        fwd = gflops(lambda: teacher(x))
    x_in = x.clone().requires_grad_(True)  # .backward(): FlopCounterMode's module hooks reject autograd.grad
    fwd_bwd_input = gflops(lambda: F.cross_entropy(teacher(x_in), y).backward())
    teacher.clip.visual.requires_grad_(True)
    fwd_bwd_params = gflops(lambda: F.cross_entropy(teacher(x), y).backward())
    return {"fwd": fwd, "fwd_bwd_input": fwd_bwd_input, "fwd_bwd_params": fwd_bwd_params}


def vqgan_flops(preset: str) -> dict[str, float]:
    vqgan = build_vqgan(load_config(VQGANConfig, presets=[VQGAN_PRESETS[preset]]))
    x_pm1 = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        quant = vqgan.encode(x_pm1)[0]
        return {"encode": gflops(lambda: vqgan.encode(x_pm1)), "decode": gflops(lambda: vqgan.decode(quant))}


def student_flops(name: str) -> dict[str, float]:
    student = build_timm(TimmConfig(name=name, num_classes=NUM_CLASSES)).train()
    x, y = torch.rand(1, 3, SIZE, SIZE), torch.tensor([0])
    with torch.no_grad():
        fwd = gflops(lambda: student(x))
    return {"fwd": fwd, "fwd_bwd": gflops(lambda: F.cross_entropy(student(x), y).backward())}


def flop_table() -> dict:
    torch.backends.mha.set_fastpath_enabled(False)  # open_clip's attention through countable ops
    return {"teachers": {a: teacher_flops(a) for a in TEACHERS}, "vqgans": {p: vqgan_flops(p) for p in VQGANS},
            "students": {s: student_flops(s) for s in STUDENTS}, "spec": SPEC}


# ---------------------------------------------------------------- CPU ms per image


def photo_jpegs(n: int, *, seed: int = 0) -> list[bytes]:
    """``n`` JPEGs (quality 90) of random crops of scikit-image's colour photos, resized to 500x375 / 375x500."""
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(getattr(skimage.data, name)()[..., :3]) for name in PHOTOS]
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        s = rng.uniform(0.6, 1.0)
        cw, ch = int(w * s), int(h * s)
        left, top = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        hw = SOURCE_HW if i % 2 == 0 else SOURCE_HW[::-1]
        image = photo.crop((left, top, left + cw, top + ch)).resize(hw[::-1], Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def train_augment() -> tuple[Callable, Callable, Callable, Callable]:
    """The paper recipe's augmentation (timm, as the official DeiT-style runs): crop, RandAugment,
    to-tensor per image, then mixup/cutmix + random erasing per batch. The one place to swap in the
    project's own augmentation when it lands."""
    crop, randaugment, to_tensor = timm.data.create_transform(
        SIZE, is_training=True, auto_augment=RANDAUGMENT, color_jitter=0.4, interpolation="bicubic",
        use_prefetcher=True, separate=True)  # use_prefetcher: uint8 out, erasing left to the batch step
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=NUM_CLASSES)
    erase = RandomErasing(probability=0.25, mode="pixel", device="cpu")

    def mix_erase(x_BCHW: torch.Tensor, y_B: torch.Tensor) -> torch.Tensor:
        x_BCHW, _ = mixup(x_BCHW.float().div_(255), y_B)
        return erase(x_BCHW)

    return crop, randaugment, to_tensor, mix_erase


def _ms_per_item(fn: Callable, items: list) -> tuple[float, list]:
    """CPU ms per item: the process's CPU time (one thread), which other work on the machine does not inflate."""
    t0 = time.process_time()
    out = [fn(item) for item in items]
    return (time.process_time() - t0) * 1e3 / len(items), out


def _jpeg(x_HWC: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x_HWC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def cpu_costs(jpegs: list[bytes], *, rounds: int, batch: int) -> tuple[dict, list[np.ndarray]]:
    """Median over rounds of ms per image of each stage; also the 224 px crops (for the shard sizes)."""
    with tempfile.TemporaryDirectory() as tmp:  # through real shards, as the teacher pool reads them
        write_shards((make_sample(f"img{i:04d}", b, i % NUM_CLASSES, image_field="jpg") for i, b in enumerate(jpegs)),
                     tmp, max_per_shard=len(jpegs), num_classes=NUM_CLASSES)
        encoded = [s["jpg"] for s in wds.WebDataset(f"{tmp}/shard-000000.tar", shardshuffle=False)]
    crop, randaugment, to_tensor, mix_erase = train_augment()
    y_B = torch.arange(batch) % NUM_CLASSES
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        stages = {}
        stages["decode"], arrays = _ms_per_item(decode_image, encoded)
        stages["crop"], crops = _ms_per_item(lambda a: crop(Image.fromarray(a)), arrays)
        stages["randaugment"], augmented = _ms_per_item(randaugment, crops)
        stages["to_tensor"], tensors = _ms_per_item(to_tensor, augmented)
        batches = [torch.stack(tensors[i:i + batch]) for i in range(0, len(tensors) - batch + 1, batch)]
        stages["mix_erase"] = _ms_per_item(lambda b: mix_erase(b, y_B), batches)[0] / batch
        crops_HWC = [np.asarray(c) for c in crops]
        stages["png_encode"], pngs = _ms_per_item(lambda c: encode_png(c, compress_level=1), crops_HWC)
        stages["png_decode"] = _ms_per_item(decode_image, pngs)[0]
        stages["jpg_encode"], jpgs = _ms_per_item(_jpeg, crops_HWC)
        stages["jpg_decode"] = _ms_per_item(decode_image, jpgs)[0]
        for name, ms in stages.items():
            times.setdefault(name, []).append(ms)
    ms = {name: statistics.median(v) for name, v in times.items()}
    return {**ms, "rounds": rounds, "images": len(jpegs), "mix_batch": batch,
            "source_jpeg_kb": sum(map(len, jpegs)) / len(jpegs) / 1e3}, crops_HWC


# ---------------------------------------------------------------- bytes per sample


def _logit_columns(prefix: str, logits_BK: np.ndarray, top_k: int) -> dict[str, np.ndarray]:
    if top_k == 0:
        return {f"{prefix}logits": logits_BK.astype(np.float16)}
    idx_Bk = np.argsort(-logits_BK, axis=1)[:, :top_k]
    return {f"{prefix}topk_values": np.take_along_axis(logits_BK, idx_Bk, 1).astype(np.float16),
            f"{prefix}topk_indices": idx_Bk.astype(np.int16)}  # int16 holds class ids below 32768


def object_store_bytes(top_k: int, *, batch: int = 64) -> dict[str, float]:
    """The teacher pool's output batch in DAD mode (cluster/engine/teacher_pool.py) per sample."""
    rng = np.random.default_rng(0)
    cols = {"key": np.array([IMAGENET_KEY] * batch), "epoch": np.zeros(batch, np.int64),
            "label": np.zeros(batch, np.int64), "valid": np.ones(batch, bool),
            "image": np.zeros((batch, SIZE, SIZE, 3), np.uint8), "teacher_pid": np.zeros(batch, np.int64),
            "dad_image": np.zeros((batch, SIZE, SIZE, 3), np.uint8)}
    for prefix in ("teacher_", "dad_teacher_"):
        cols |= _logit_columns(prefix, rng.standard_normal((batch, NUM_CLASSES)), top_k)
    block = BlockAccessor.batch_to_block(cols)
    return {"measured": BlockAccessor.for_block(block).size_bytes() / batch,
            "computed": sum(v.nbytes for v in cols.values()) / batch}


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def shard_bytes(crops_HWC: list[np.ndarray], *, image_format: str, top_k: int) -> float:
    """Tar bytes per sample of offline DAD shards (the schema of robust.data.shards; JPEG and top-k as
    it would name them: ``jpg``/``dad.jpg``, ``{,dad.}topk.values.npy`` + ``{,dad.}topk.indices.npy``)."""
    encode = (lambda c: encode_png(c, compress_level=1)) if image_format == "png" else _jpeg
    rng = np.random.default_rng(0)
    n = len(crops_HWC) // 2
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dad-000000.tar"
        with wds.TarWriter(str(path), mtime=0) as tar:  # the writer write_shards uses
            for i in range(n):
                sample = {"__key__": f"{IMAGENET_KEY}_{i}", image_format: encode(crops_HWC[2 * i]),
                          f"dad.{image_format}": encode(crops_HWC[2 * i + 1]), "cls": str(i % NUM_CLASSES)}
                for prefix in ("", "dad."):
                    logits_1K = rng.standard_normal((1, NUM_CLASSES))
                    for name, col in _logit_columns("", logits_1K, top_k).items():
                        sample[f"{prefix}{name.replace('_', '.')}.npy"] = _npy(col[0])
                tar.write(sample)
        return path.stat().st_size / n


def byte_table(crops_HWC: list[np.ndarray], top_ks: list[int]) -> dict:
    variants = {"full": 0} | {f"top{k}": k for k in top_ks}
    return {"object_store": {name: object_store_bytes(k) for name, k in variants.items()},
            "offline_shard": {fmt: {name: shard_bytes(crops_HWC, image_format=fmt, top_k=k)
                                    for name, k in variants.items()} for fmt in ("png", "jpg")}}


def run(*, images: int, rounds: int, batch: int, top_ks: list[int]) -> dict:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    flops = flop_table()
    cpu, crops = cpu_costs(photo_jpegs(images), rounds=rounds, batch=batch)
    return {"machine": machine(), "image_size": SIZE, "num_classes": NUM_CLASSES, "flops": flops, "cpu_ms": cpu,
            "bytes": byte_table(crops, top_ks), "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="JPEGs in the shard set (even)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="images per mixup/erasing batch")
    parser.add_argument("--top-k", type=int, nargs="*", default=[10], help="top-k sizes to measure")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(images=args.images, rounds=args.rounds, batch=args.batch, top_ks=args.top_k)
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in result["cpu_ms"].items()})
    save_result(args.out, result)


if __name__ == "__main__":
    main()
