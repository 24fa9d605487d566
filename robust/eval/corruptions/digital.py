"""Digital corruptions: brightness, contrast, saturate, elastic transform, pixelate, JPEG.

Per-severity parameters are imagecorruptions' (the ImageNet-C code). Brightness and saturate change V
or S of scikit-image's HSV, in closed form on RGB; pixelate reproduces PIL's 8-bit BOX-down / NEAREST-up
resize; JPEG goes through libjpeg (OpenCV's) at the PIL quality, on the CPU.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch

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
    # The reference: PIL's BOX resize down to int(n * factor) samples, then NEAREST back to n.
    factor = (0.6, 0.5, 0.4, 0.3, 0.25)[severity - 1]
    h, w = x.shape[-2:]
    return box_then_nearest(x, max(1, int(h * factor)), max(1, int(w * factor)))  # PIL fails below 1


def box_then_nearest(x: Tensor, small_h: int, small_w: int) -> Tensor:
    """PIL's BOX resize of 8-bit images to (small_h, small_w), then NEAREST back: along W, rounded to the
    8-bit grid, then along H, rounded again, as PIL does; then PIL's nearest pixels are gathered."""
    h, w = x.shape[-2:]
    small = _round_8bit(along_w(x, _box_map(w, small_w, x.device, x.dtype)))
    small = _round_8bit(along_h(small, _box_map(h, small_h, x.device, x.dtype)))
    small = small.index_select(-1, _nearest_index(small_w, w, x.device))
    return small.index_select(-2, _nearest_index(small_h, h, x.device))


def _round_8bit(x: Tensor) -> Tensor:
    """To the nearest grey level, halves up as PIL's fixed point (1e-3 of a level absorbs float32 error)."""
    return x.mul_(255).add_(0.5 + 1e-3).floor_().div_(255)


@functools.lru_cache(maxsize=64)
def _box_map(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> AxisMap:
    """PIL's BOX resampling weights (precompute_coeffs) from n_in to n_out samples."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    center = (torch.arange(n_out, dtype=torch.float64)[:, None] + 0.5) * scale
    src = torch.arange(n_in, dtype=torch.float64)[None, :]
    lo = torch.floor(center - support + 0.5).clamp_min(0)
    hi = torch.floor(center + support + 0.5).clamp_max(n_in)
    t = (src - center + 0.5) * (1 / filterscale)  # as PIL computes it: a pixel on the edge can drop out
    weight = ((t > -0.5) & (t <= 0.5) & (src >= lo) & (src < hi)).double()
    return axis_map((weight / weight.sum(1, keepdim=True)).T, device, dtype)


@functools.lru_cache(maxsize=64)
def _nearest_index(n_in: int, n_out: int, device: torch.device) -> Tensor:
    """PIL's NEAREST resize source index: a running sum of in/out from half a step (ImagingScaleAffine);
    torch's "nearest-exact" rounds its exact halves either way."""
    step, pos, out = n_in / n_out, 0.5 * n_in / n_out, []
    for _ in range(n_out):
        out.append(int(pos))
        pos += step
    return torch.tensor(out, device=device)


JPEG_QUALITY = (25, 18, 15, 10, 7)  # PIL's quality per severity


@register("jpeg_compression")
def jpeg_compression(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    # OpenCV's libjpeg round trip gives PIL's pixels (the same quality tables, 4:2:0 chroma and decoder;
    # OpenCV reads and writes BGR). On the CPU for any device (nvJPEG's output has not been checked
    # against PIL), image by image over a thread pool: OpenCV releases the GIL, and per image the
    # conversions (rounding to uint8, interleaving the planes) stay in the cache.
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY[severity - 1]]
    x_cpu = x.cpu()
    out = torch.empty_like(x_cpu)

    def round_trip(i: int) -> None:
        bgr = cv2.merge([cv2.convertScaleAbs(plane, alpha=255) for plane in x_cpu[i].numpy()[::-1]])
        decoded = cv2.imdecode(cv2.imencode(".jpg", bgr, params)[1], cv2.IMREAD_COLOR)
        for plane, out_plane in zip(cv2.split(decoded), out[i].numpy()[::-1]):
            np.divide(plane, 255, out=out_plane, dtype=np.float32)

    list(_image_pool().map(round_trip, range(len(x_cpu))))
    return out.to(x.device)


@functools.cache
def _image_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(torch.get_num_threads())
