"""ImageNet-C corruptions in torch, batched, on any device: ``corrupt(x_BCHW, name, severity)``.

The reference is the ``imagecorruptions`` package (Hendrycks & Dietterich's ImageNet-C code); each
corruption matches its per-severity parameters. Images are float tensors in [0, 1], shape (B, C, H, W).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable

import torch

CorruptionFn = Callable[[torch.Tensor, int, "torch.Generator | None"], torch.Tensor]

IMAGENET_C: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
EXTRA: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL: tuple[str, ...] = IMAGENET_C + EXTRA

_REGISTRY: dict[str, CorruptionFn] = {}

# CPU batches go through in chunks of about this size. A 64-image batch at 224 px (38 MB) exceeds the
# last-level cache and glibc's mmap threshold (32 MB), so each full-size temporary would page-fault
# afresh; chunk-sized ones stay in cache and are reused. Random draws are made chunk by chunk.
CPU_CHUNK_BYTES = 4 << 20
# The output itself is such a buffer, fresh pages on every call: faulting them in 4 KB at a time costs
# about as much as a cheap corruption (0.2 ms per image at 224 px on 2 cores), so a CPU output of a
# huge page or more is memory advised for 2 MB transparent huge pages. (torch does the same for every
# allocation under THP_MEM_ALLOC_ENABLE=1, but only when that is set before it starts.)
HUGE_PAGE_BYTES = 2 << 20


def register(name: str) -> Callable[[CorruptionFn], CorruptionFn]:
    assert name in ALL, name

    def deco(fn: CorruptionFn) -> CorruptionFn:
        _REGISTRY[name] = fn
        return fn

    return deco


@torch.no_grad()
def corrupt(
    x_BCHW: torch.Tensor, name: str, severity: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1-5) to a batch of [0, 1] images; same shape and dtype.

    A data transform, not differentiable (quantisation, JPEG, random shuffles): runs without autograd.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown corruption {name!r}; choose one of {sorted(_REGISTRY)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be 1..5, got {severity}")
    if x_BCHW.ndim != 4 or not x_BCHW.is_floating_point():
        raise ValueError(f"expected a float (B, C, H, W) batch in [0, 1], got {tuple(x_BCHW.shape)} {x_BCHW.dtype}")
    if x_BCHW.shape[1] != 3:
        raise ValueError(f"expected RGB images (3 channels), got {x_BCHW.shape[1]}; repeat grey images to 3 channels")
    fn = _REGISTRY[name]
    if x_BCHW.device.type != "cpu":
        return fn(x_BCHW.float(), severity, generator).clamp_(0, 1).to(x_BCHW.dtype)
    out = _empty_cpu_output(x_BCHW)
    n = max(1, CPU_CHUNK_BYTES // (4 * x_BCHW[0].numel()))
    for x_chunk, out_chunk in zip(x_BCHW.split(n), out.split(n)):
        out_chunk.copy_(fn(x_chunk.float(), severity, generator).clamp_(0, 1))
    return out


def _empty_cpu_output(like: torch.Tensor) -> torch.Tensor:
    nbytes = like.numel() * like.element_size()
    if nbytes < HUGE_PAGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):  # Linux only
        return torch.empty_like(like)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buffer, dtype=like.dtype).view(like.shape)  # the tensor keeps the buffer


# Importing the modules fills the registry.
from robust.eval.corruptions import blur, digital, noise, weather  # noqa: E402,F401
