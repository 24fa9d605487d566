"""Digital corruptions: brightness, contrast, saturate, elastic transform, pixelate, JPEG.

Per-severity parameters are imagecorruptions' (the ImageNet-C code). Brightness and saturate change V
or S of scikit-image's HSV, in closed form on RGB; pixelate reproduces PIL's BOX-down / NEAREST-up
resize; JPEG goes through libjpeg (torchvision.io) at the PIL quality, on the CPU.
"""

from __future__ import annotations

import functools

import torch
from torchvision.io import decode_jpeg, encode_jpeg

from robust.eval.corruptions import register
from robust.eval.corruptions._filters import AxisMap, along_h, along_w, axis_map, gaussian_blur, rand, warp

Tensor = torch.Tensor


@register("brightness")
def brightness(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    # The reference adds to V in scikit-image's HSV. Every RGB channel is V times a function of H and S,
    # so with H and S kept the channels scale by V'/V; black (V = 0, grey hue) becomes grey V'.
    v = x.amax(1, keepdim=True)
    v_new = (v + (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]).clamp_(max=1)
    return torch.where(v > 0, x * (v_new / v), v_new)


@register("saturate")
def saturate(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    # The reference sets S' = clip(S * scale + shift, 0, 1) in scikit-image's HSV. Each channel is
    # V (1 - S a) with a depending on the hue only, so with V and H kept, x' = V - (S' / S) (V - x).
    # Grey pixels (S = 0) have hue 0, which hsv2rgb turns into (V, V (1 - S'), V (1 - S')).
    scale, shift = ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2))[severity - 1]
    v = x.amax(1, keepdim=True)
    delta = v - x.amin(1, keepdim=True)
    grey = delta == 0
    s = delta / torch.where(grey, 1.0, v)
    s_new = (s * scale + shift).clamp_(0, 1)
    coloured = v - (s_new / torch.where(grey, 1.0, s)) * (v - x)
    not_red = torch.tensor([0.0, 1.0, 1.0], device=x.device).view(1, 3, 1, 1)
    return torch.where(grey, v * (1 - s_new * not_red), coloured)


@register("contrast")
def contrast(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    means = x.mean((2, 3), keepdim=True)  # per image and channel
    return (x - means).mul_((0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]).add_(means)


@register("elastic_transform")
def elastic_transform(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    # imagecorruptions 1.1's version: smoothed uniform displacements, no affine part; sizes scale with H, W.
    b, _, h, w = x.shape
    alpha = 250 * (0.05, 0.065, 0.085, 0.1, 0.12)[severity - 1]
    max_shift = 0.005 * h  # the reference uses the height for both axes
    field = (rand(b, 2, h, w, like=x, generator=generator) * 2 - 1) * max_shift
    dx, dy = (gaussian_blur(field, (0.01 * h, 0.01 * w), truncate=3.0, mode="symmetric") * alpha).unbind(1)
    return warp(x, dy, dx)


@register("pixelate")
def pixelate(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    factor = (0.6, 0.5, 0.4, 0.3, 0.25)[severity - 1]
    h, w = x.shape[-2:]
    return along_h(along_w(x, _pixelate_map(w, factor, x.device, x.dtype)), _pixelate_map(h, factor, x.device, x.dtype))


@functools.lru_cache(maxsize=64)
def _pixelate_map(n: int, factor: float, device: torch.device, dtype: torch.dtype) -> AxisMap:
    """PIL's BOX resize from n to int(n * factor) samples then NEAREST back to n, as one (n, n) map."""
    small = max(1, int(n * factor))  # the reference (PIL) fails below 1
    up = torch.zeros(small, n, dtype=torch.float64)
    up[_nearest_index(small, n), torch.arange(n)] = 1
    return axis_map(_box_matrix(n, small).T @ up, device, dtype)


def _box_matrix(n_in: int, n_out: int) -> Tensor:
    """PIL's BOX resampling weights (precompute_coeffs), shape (n_out, n_in)."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    center = (torch.arange(n_out, dtype=torch.float64)[:, None] + 0.5) * scale
    src = torch.arange(n_in, dtype=torch.float64)[None, :]
    lo = torch.floor(center - support + 0.5).clamp_min(0)
    hi = torch.floor(center + support + 0.5).clamp_max(n_in)
    t = (src - center + 0.5) / filterscale
    weight = ((t > -0.5) & (t <= 0.5) & (src >= lo) & (src < hi)).double()
    return weight / weight.sum(1, keepdim=True)


def _nearest_index(n_in: int, n_out: int) -> Tensor:
    """PIL's NEAREST resize source index: a running sum of in/out from half a step (ImagingScaleAffine)."""
    step, pos, out = n_in / n_out, 0.5 * n_in / n_out, []
    for _ in range(n_out):
        out.append(int(pos))
        pos += step
    return torch.tensor(out)


JPEG_QUALITY = (25, 18, 15, 10, 7)  # PIL's quality per severity


@register("jpeg_compression")
def jpeg_compression(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    # libjpeg on the CPU, as PIL: the same quality tables and 4:2:0 chroma, so the same bytes. (nvJPEG on
    # CUDA would save the copy, but its output has not been checked against PIL.)
    quality = JPEG_QUALITY[severity - 1]
    images = list(x.mul(255).round_().to(torch.uint8).cpu())
    decoded = decode_jpeg(encode_jpeg(images, quality=quality))
    return torch.stack(decoded).to(x.device, x.dtype).div_(255)
