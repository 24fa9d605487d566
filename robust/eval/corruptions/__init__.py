"""ImageNet-C corruptions in torch, batched, on any device: ``corrupt(x_BCHW, name, severity)``.

The reference is the ``imagecorruptions`` package (Hendrycks & Dietterich's ImageNet-C code); each
corruption matches its per-severity parameters. Images are float tensors in [0, 1], shape (B, C, H, W).
"""

from __future__ import annotations

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


def register(name: str) -> Callable[[CorruptionFn], CorruptionFn]:
    assert name in ALL, name

    def deco(fn: CorruptionFn) -> CorruptionFn:
        _REGISTRY[name] = fn
        return fn

    return deco


def corrupt(
    x_BCHW: torch.Tensor, name: str, severity: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1-5) to a batch of [0, 1] images; same shape and dtype."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown corruption {name!r}; choose one of {sorted(_REGISTRY)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be 1..5, got {severity}")
    if x_BCHW.ndim != 4 or not x_BCHW.is_floating_point():
        raise ValueError(f"expected a float (B, C, H, W) batch in [0, 1], got {tuple(x_BCHW.shape)} {x_BCHW.dtype}")
    if x_BCHW.shape[1] != 3:
        raise ValueError(f"expected RGB images (3 channels), got {x_BCHW.shape[1]}; repeat grey images to 3 channels")
    out = _REGISTRY[name](x_BCHW.float(), severity, generator)
    return out.clamp_(0, 1).to(x_BCHW.dtype)


# Importing the modules fills the registry.
from robust.eval.corruptions import blur, digital, noise, weather  # noqa: E402,F401
