"""Digital corruptions: brightness, contrast, saturate, elastic transform, pixelate, JPEG.

Per-severity parameters are imagecorruptions' (the ImageNet-C code). HSV is scikit-image's conversion;
pixelate reproduces PIL's BOX-down / NEAREST-up resize; JPEG goes through libjpeg (torchvision.io)
at the PIL quality, on the CPU.
"""

from __future__ import annotations

import functools

import torch
from torchvision.io import decode_jpeg, encode_jpeg

from robust.eval.corruptions import register
from robust.eval.corruptions._filters import gaussian_blur, rand, warp

Tensor = torch.Tensor

# hsv_to_rgb picks (r, g, b) from (v, p, q, t) by hue sector (skimage.color.hsv2rgb's np.choose).
_SECTOR_RGB = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


def rgb_to_hsv(x_BCHW: Tensor) -> Tensor:
    """``skimage.color.rgb2hsv`` on (B, 3, H, W): hue in [0, 1), ties resolved blue > green > red."""
    r, g, b = x_BCHW.unbind(1)
    v = x_BCHW.amax(1)
    delta = v - x_BCHW.amin(1)
    grey = delta == 0
    safe = torch.where(grey, torch.ones_like(delta), delta)
    h = torch.where(r == v, (g - b) / safe, torch.zeros_like(v))
    h = torch.where(g == v, 2 + (b - r) / safe, h)
    h = torch.where(b == v, 4 + (r - g) / safe, h)
    h = torch.where(grey, torch.zeros_like(h), (h / 6) % 1)
    s = torch.where(grey, torch.zeros_like(v), delta / torch.where(v == 0, torch.ones_like(v), v))
    return torch.stack([h, s, v], 1)


def hsv_to_rgb(hsv_BCHW: Tensor) -> Tensor:
    """``skimage.color.hsv2rgb`` on (B, 3, H, W)."""
    h, s, v = hsv_BCHW.unbind(1)
    sector = torch.floor(h * 6)
    f = h * 6 - sector
    vpqt = torch.stack([v, v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)], 1)
    pick = _SECTOR_RGB.to(h.device)[sector.long() % 6].permute(0, 3, 1, 2)
    return vpqt.gather(1, pick)


@register("brightness")
def brightness(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    hsv = rgb_to_hsv(x)
    hsv[:, 2] = (hsv[:, 2] + (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]).clamp(0, 1)
    return hsv_to_rgb(hsv)


@register("saturate")
def saturate(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    scale, shift = ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2))[severity - 1]
    hsv = rgb_to_hsv(x)
    hsv[:, 1] = (hsv[:, 1] * scale + shift).clamp(0, 1)
    return hsv_to_rgb(hsv)


@register("contrast")
def contrast(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    means = x.mean((2, 3), keepdim=True)  # per image and channel
    return (x - means) * (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1] + means


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
    sh, sw = int(h * factor), int(w * factor)
    small = torch.einsum("ih,bchw,jw->bcij", _box_matrix(h, sh).to(x), x, _box_matrix(w, sw).to(x))
    rows, cols = _nearest_index(sh, h).to(x.device), _nearest_index(sw, w).to(x.device)
    return small.index_select(2, rows).index_select(3, cols)


@functools.lru_cache(maxsize=64)
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


@functools.lru_cache(maxsize=64)
def _nearest_index(n_in: int, n_out: int) -> Tensor:
    """PIL's NEAREST resize source index: a running sum of in/out from half a step (ImagingScaleAffine)."""
    step, pos, out = n_in / n_out, 0.5 * n_in / n_out, []
    for _ in range(n_out):
        out.append(int(pos))
        pos += step
    return torch.tensor(out)


@register("jpeg_compression")
def jpeg_compression(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    # libjpeg on the CPU, as PIL: the same quality tables and 4:2:0 chroma, so the same bytes. (nvJPEG on
    # CUDA would save the copy, but its output has not been checked against PIL.)
    quality = (25, 18, 15, 10, 7)[severity - 1]
    images = list((x * 255).round().to(torch.uint8).cpu())
    decoded = decode_jpeg(encode_jpeg(images, quality=quality))
    return torch.stack(decoded).to(x.device, x.dtype) / 255
