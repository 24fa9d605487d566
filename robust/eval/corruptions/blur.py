"""Blur corruptions: defocus (disk), glass (blur, local pixel shuffles, blur), motion, zoom, Gaussian.

Per-severity parameters are imagecorruptions' (the ImageNet-C code); each is a batched product of
banded matrices, slice sum or gather on the input's device.
"""

from __future__ import annotations

import functools
import math

import torch

from robust.eval.corruptions import register
from robust.eval.corruptions._filters import (
    clipped_zoom, disk_kernel, filter2d, gaussian_blur as _gaussian, motion_blur as _motion, rand, randint,
)  # fmt: skip

Tensor = torch.Tensor


@register("gaussian_blur")
def gaussian_blur(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    return _gaussian(x, (1.0, 2.0, 3.0, 4.0, 6.0)[severity - 1])


@register("defocus_blur")
def defocus_blur(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    radius, alias_blur = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))[severity - 1]
    return filter2d(x, _disk(radius, alias_blur), "reflect")


@functools.lru_cache(maxsize=8)
def _disk(radius: float, alias_blur: float) -> Tensor:
    return disk_kernel(radius, alias_blur)


@register("motion_blur")
def motion_blur(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    radius, sigma = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))[severity - 1]
    angle_B = rand(x.shape[0], like=x, generator=generator) * 90 - 45  # degrees, uniform(-45, 45)
    return _motion(x, radius, sigma, angle_B)


_ZOOMS: tuple[tuple[float, float], ...] = ((1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03))


def _numpy_arange(start: float, stop: float, step: float) -> list[float]:
    """np.arange's values to the last bit (start + i * ((start + step) - start)): the zoomed size
    round(crop * zoom) can hang on it, e.g. 25 * 1.3000000000000003 -> 33 but 25 * 1.3 -> 32."""
    delta = (start + step) - start
    return [start + i * delta for i in range(math.ceil((stop - start) / step))]


@register("zoom_blur")
def zoom_blur(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    # The mean of the image and its centre zooms, factor 1 (the image itself) included, as in the reference.
    zooms = _numpy_arange(1.0, *_ZOOMS[severity - 1])
    assert zooms[0] == 1.0, zooms
    out = x * 2
    for z in zooms[1:]:
        out += clipped_zoom(x, z, crop=True)
    return out / (len(zooms) + 1)


@register("glass_blur")
def glass_blur(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    sigma, max_delta, iterations = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))[severity - 1]
    b, c, h, w = x.shape
    # The reference stores the first blur as uint8 (truncating); 1e-3 keeps exact levels on their level.
    x = torch.floor(_gaussian(x, sigma) * 255 + 1e-3) / 255
    src_BN = torch.arange(h * w, device=x.device).repeat(b, 1)
    for _ in range(iterations):
        dy, dx = randint(-max_delta, max_delta, 2, b, h, w, like=x, generator=generator)
        src_BN = src_BN.gather(1, local_copies(dy, dx, max_delta))
    x = x.flatten(2).gather(2, src_BN[:, None].expand(b, c, h * w)).view(b, c, h, w)
    return _gaussian(x, sigma)


def local_copies(dy_BHW: Tensor, dx_BHW: Tensor, max_delta: int) -> Tensor:
    """Source pixel (flat index) of every pixel after one pass of the reference's "swap" loop.

    The loop visits (i, j) for i = H-d .. d+1, j = W-d .. d+1 (descending) and runs
    ``x[i, j], x[i', j'] = x[i', j'], x[i, j]`` with (i', j') = (i + dy, j + dx), dy, dx in [-d, d).
    On numpy rows that only copies x[i', j'] into x[i, j] (the second assignment reads the first's
    result), so each visited pixel takes the value (i', j') holds at its visit: its final value when
    (i', j') was visited earlier (lower row, or same row and right of it), else its original value.
    The chains of "earlier" links are followed by pointer jumping, all pixels at once.
    """
    b, h, w = dy_BHW.shape
    d = max_delta
    rows = torch.arange(h, device=dy_BHW.device).view(1, h, 1)
    cols = torch.arange(w, device=dy_BHW.device).view(1, 1, w)
    visited = (rows > d) & (rows <= h - d) & (cols > d) & (cols <= w - d)
    ti, tj = rows + dy_BHW, cols + dx_BHW
    target_visited = (ti > d) & (ti <= h - d) & (tj > d) & (tj <= w - d)
    earlier = target_visited & ((dy_BHW > 0) | ((dy_BHW == 0) & (dx_BHW > 0)))
    src = torch.where(visited, ti * w + tj, rows * w + cols).flatten(1)
    pending = (visited & earlier).flatten(1)  # src is a pixel whose final value is still to be looked up
    while pending.any():
        src, pending = torch.where(pending, src.gather(1, src), src), pending & pending.gather(1, src)
    return src
