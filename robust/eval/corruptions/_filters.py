"""Shared image operations for the corruption suite: seeded draws, linear maps along an axis (blurs,
zooms, resampling), motion blur, warps, and OpenCV's 8-bit operations.

Every function works on a batch on the tensor's own device. Border modes are named after what they
reproduce: "replicate" (scipy "nearest"), "symmetric" (scipy "reflect", d c b a | a b c d) and
"reflect" (OpenCV's default BORDER_REFLECT_101, c b | a b c).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# ---- random draws: only from the caller's generator, on its device, then moved to the image's device


def _draw_device(like: Tensor, generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else like.device


def rand(*size: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform [0, 1) float32 of ``size`` on ``like``'s device."""
    return torch.rand(size, generator=generator, device=_draw_device(like, generator)).to(like.device)


def randn(*size: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal float32 of ``size`` on ``like``'s device."""
    return torch.randn(size, generator=generator, device=_draw_device(like, generator)).to(like.device)


def randint(low: int, high: int, *size: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Integers in [low, high) (numpy's ``randint`` convention) on ``like``'s device."""
    dev = _draw_device(like, generator)
    return torch.randint(low, high, size, generator=generator, device=dev).to(like.device)


def poisson(rate: Tensor, *, generator: torch.Generator | None) -> Tensor:
    """Poisson draws with the given rates, same shape and device as ``rate``."""
    return torch.poisson(rate.to(_draw_device(rate, generator)), generator=generator).to(rate.device)


# ---- linear maps along one axis, as banded matrix products


def pad_index(n: int, pad: int, mode: str) -> Tensor:
    """Source index of each position of an axis of length ``n`` padded by ``pad`` on both sides."""
    i = torch.arange(-pad, n + pad)
    if mode == "replicate":
        return i.clamp(0, n - 1)
    if mode == "symmetric":
        i = i.remainder(2 * n)
        return torch.where(i >= n, 2 * n - 1 - i, i)
    assert mode == "reflect", mode
    if n == 1:
        return torch.zeros_like(i)
    i = i.remainder(2 * n - 2)
    return torch.where(i >= n, 2 * n - 2 - i, i)


_TILE = 32  # outputs per product: narrow, so that each reads little more than the band it needs


@dataclass(frozen=True)
class AxisMap:
    """``y = x @ M`` along one axis for a banded ``M`` of shape (n_in, n_out), kept as column tiles
    with only the rows they read: outputs [a, a + 32) need inputs [lo, hi). Tile by tile the products
    skip M's zeros (a 9-tap blur reads 40 of 224 rows per 32 outputs), and the border handling lives
    in M, so nothing is padded."""

    n_in: int
    n_out: int
    tiles: tuple[tuple[int, int, Tensor], ...]  # (lo, hi, M[lo:hi, a:a + 32]) for a = 0, 32, ...


def axis_map(m: Tensor, device: torch.device, dtype: torch.dtype) -> AxisMap:
    tiles = []
    for a in range(0, m.shape[1], _TILE):
        block = m[:, a : a + _TILE]
        rows = block.ne(0).any(1).nonzero()
        lo, hi = (int(rows.min()), int(rows.max()) + 1) if len(rows) else (0, 1)
        tiles.append((lo, hi, block[lo:hi].to(device, dtype).contiguous()))
    return AxisMap(m.shape[0], m.shape[1], tuple(tiles))


def along_w(x: Tensor, amap: AxisMap) -> Tensor:
    """Apply ``amap`` along the last axis."""
    assert x.shape[-1] == amap.n_in, (x.shape, amap.n_in)
    out = x.new_empty(*x.shape[:-1], amap.n_out)
    for a, (lo, hi, m) in zip(range(0, amap.n_out, _TILE), amap.tiles):
        torch.matmul(x[..., lo:hi], m, out=out[..., a : a + m.shape[1]])
    return out


def along_h(x: Tensor, amap: AxisMap) -> Tensor:
    """Apply ``amap`` along the second-to-last axis."""
    assert x.shape[-2] == amap.n_in, (x.shape, amap.n_in)
    out = x.new_empty(*x.shape[:-2], amap.n_out, x.shape[-1])
    for a, (lo, hi, m) in zip(range(0, amap.n_out, _TILE), amap.tiles):
        torch.matmul(m.mT, x[..., lo:hi, :], out=out[..., a : a + m.shape[1], :])
    return out


@functools.lru_cache(maxsize=256)
def correlation_map(
    n: int, kernel: tuple[float, ...], mode: str, device: torch.device, dtype: torch.dtype
) -> AxisMap:
    """Correlation with an odd-sized kernel, borders padded by ``mode``, as an (n, n) map."""
    r = len(kernel) // 2
    src = pad_index(n, r, mode)
    m = torch.zeros(n, n, dtype=torch.float64)
    out = torch.arange(n)
    for t, k in enumerate(kernel):
        m.index_put_((src[t : t + n], out), torch.full((n,), k, dtype=torch.float64), accumulate=True)
    return axis_map(m, device, dtype)


def separable(x_BCHW: Tensor, k_rows: Tensor, k_cols: Tensor, mode: str) -> Tensor:
    """Correlate along H with ``k_rows`` and along W with ``k_cols`` (odd sizes), same size out."""
    h, w = x_BCHW.shape[-2:]
    dev, dt = x_BCHW.device, x_BCHW.dtype
    y = along_w(x_BCHW, correlation_map(w, tuple(k_cols.tolist()), mode, dev, dt))
    return along_h(y, correlation_map(h, tuple(k_rows.tolist()), mode, dev, dt))


def pad2d(x: Tensor, ph: int, pw: int, mode: str) -> Tensor:
    """Pad the last two dims by ``ph`` rows and ``pw`` columns on each side; any pad size works."""
    h, w = x.shape[-2:]
    if mode == "replicate" or (mode == "reflect" and ph < h and pw < w):
        return F.pad(x, (pw, pw, ph, ph), mode=mode)
    rows, cols = pad_index(h, ph, mode).to(x.device), pad_index(w, pw, mode).to(x.device)
    return x[..., rows[:, None], cols]


def filter2d(x_BCHW: Tensor, k_KK: Tensor, mode: str) -> Tensor:
    """Correlate every channel with the odd-sized kernel ``k_KK`` (OpenCV ``filter2D``), same size out.

    By FFT of the padded image: for a defocus disk (17 x 17 taps and up) it costs less than a direct
    convolution or the disk's separable terms (about r / 2 + 2 of them).
    """
    kh, kw = k_KK.shape
    h, w = x_BCHW.shape[-2:]
    size = (_fft_size(h + kh - 1), _fft_size(w + kw - 1))
    spectrum = _spectrum(tuple(k_KK.flatten().tolist()), kh, size, x_BCHW.device)
    y = torch.fft.rfft2(pad2d(x_BCHW, kh // 2, kw // 2, mode), s=size)
    # The product is a circular convolution with the flipped kernel: output o lands at o + k - 1.
    return torch.fft.irfft2(y * spectrum, s=size)[..., kh - 1 : kh - 1 + h, kw - 1 : kw - 1 + w]


def _fft_size(n: int) -> int:
    """The smallest length >= n with no prime factor above 5 (fast FFT lengths)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


@functools.lru_cache(maxsize=32)
def _spectrum(kernel: tuple[float, ...], kh: int, size: tuple[int, int], device: torch.device) -> Tensor:
    k = torch.tensor(kernel, dtype=torch.float64).view(kh, -1).flip(0, 1)
    return torch.fft.rfft2(k, s=size).to(device, torch.complex64)


# ---- kernels and blurs


def gaussian_kernel1d(sigma: float, truncate: float) -> Tensor:
    """scipy.ndimage's kernel: radius int(truncate * sigma + 0.5), normalised, float64."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(
    x_BCHW: Tensor, sigma: float | tuple[float, float], *, truncate: float = 4.0, mode: str = "replicate"
) -> Tensor:
    """``skimage.filters.gaussian`` over H and W (defaults: scipy mode "nearest", truncate 4)."""
    sy, sx = sigma if isinstance(sigma, tuple) else (sigma, sigma)
    return separable(x_BCHW, gaussian_kernel1d(sy, truncate), gaussian_kernel1d(sx, truncate), mode)


def disk_kernel(radius: float, alias_blur: float) -> Tensor:
    """The reference's anti-aliased disk: a normalised binary disk, then cv2.GaussianBlur (3 or 5 taps)."""
    half, ksize = (8, 3) if radius <= 8 else (int(radius), 5)
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).double()
    g = torch.exp(-((torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2) ** 2) / (2 * alias_blur**2))
    g = g / g.sum()
    return separable((disk / disk.sum())[None, None], g, g, "reflect")[0, 0]


def motion_blur(x_BCHW: Tensor, radius: int, sigma: float, angle_B: Tensor) -> Tensor:
    """imagecorruptions' ``_motion_blur`` per image: a one-sided Gaussian-weighted sum of copies shifted
    along the angle (degrees), edges replicated; copies stop once a shift reaches the image size.

    Each copy is a slice of the edge-padded image added in place, image by image: the shifts differ
    per image, and slices cost no index tensors.
    """
    b, _, h, w = x_BCHW.shape
    width = 2 * radius + 1
    i = torch.arange(width, dtype=torch.float64)
    weight = torch.exp(-(i**2) / (2 * sigma**2))
    weight = (weight / weight.sum()).tolist()
    rad = torch.deg2rad(angle_B.double().cpu())[:, None]
    py, px = width * torch.sin(rad), width * torch.cos(rad)
    hyp = torch.hypot(py, px)
    dy = -torch.ceil(i * py / hyp - 0.5).long()  # (B, width)
    dx = -torch.ceil(i * px / hyp - 0.5).long()
    taps = ((dy.abs() < h) & (dx.abs() < w)).long().cumprod(1).sum(1).tolist()  # the reference breaks at the first miss
    pad = max(int(dy.abs().max()), int(dx.abs().max()))
    xp = F.pad(x_BCHW, (pad, pad, pad, pad), mode="replicate")
    out = torch.zeros_like(x_BCHW)
    for n, (dy_n, dx_n) in enumerate(zip(dy.tolist(), dx.tolist())):
        for k in range(taps[n]):
            top, left = pad - dy_n[k], pad - dx_n[k]
            out[n].add_(xp[n, :, top : top + h, left : left + w], alpha=weight[k])
    return out


@functools.lru_cache(maxsize=256)
def zoom_map(n: int, zoom: float, n_out: int, device: torch.device, dtype: torch.dtype) -> AxisMap:
    """One axis of imagecorruptions' ``clipped_zoom``: the centre crop of ceil(n / zoom) samples scaled
    by ``zoom`` like scipy ``zoom(order=1)`` (corner-aligned linear interpolation, round(crop * zoom)
    outputs), of which the first ``n_out`` are kept."""
    crop = math.ceil(n / zoom)
    top, size = (n - crop) // 2, round(crop * zoom)
    assert n_out <= size, (n, zoom, n_out)
    s = torch.arange(n_out, dtype=torch.float64) * ((crop - 1) / (size - 1) if size > 1 else 0.0)
    i0 = s.floor().long().clamp(max=crop - 1)
    frac = s - i0
    m = torch.zeros(n, n_out, dtype=torch.float64)
    out = torch.arange(n_out)
    m.index_put_((top + i0, out), 1 - frac, accumulate=True)
    m.index_put_((top + (i0 + 1).clamp(max=crop - 1), out), frac, accumulate=True)
    return axis_map(m, device, dtype)


def zoomed_size(n: int, zoom: float) -> int:
    return round(math.ceil(n / zoom) * zoom)


def clipped_zoom(x_BCHW: Tensor, zoom: float, *, crop: bool = False) -> Tensor:
    """imagecorruptions' ``clipped_zoom``: output size round(ceil(n / zoom) * zoom) >= the input size,
    or the input size with ``crop`` (the reference's callers crop the top-left corner)."""
    h, w = x_BCHW.shape[-2:]
    oh, ow = (h, w) if crop else (zoomed_size(h, zoom), zoomed_size(w, zoom))
    dev, dt = x_BCHW.device, x_BCHW.dtype
    return along_h(along_w(x_BCHW, zoom_map(w, zoom, ow, dev, dt)), zoom_map(h, zoom, oh, dev, dt))


def warp(x_BCHW: Tensor, dy_BHW: Tensor, dx_BHW: Tensor) -> Tensor:
    """Sample pixel (i + dy, j + dx) bilinearly, mirroring about the outer pixel edges: scipy's
    ``map_coordinates(order=1, mode="reflect")``, done by grid_sample."""
    h, w = x_BCHW.shape[-2:]
    rows = torch.arange(h, device=x_BCHW.device, dtype=x_BCHW.dtype).view(1, h, 1)
    cols = torch.arange(w, device=x_BCHW.device, dtype=x_BCHW.dtype).view(1, 1, w)
    # Pixel centres to grid_sample's [-1, 1] (align_corners=False); "reflection" mirrors about -0.5 and n-0.5.
    grid = torch.stack([(2 * (cols + dx_BHW) + 1) / w - 1, (2 * (rows + dy_BHW) + 1) / h - 1], -1)
    return F.grid_sample(x_BCHW, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def rgb_to_gray(x_BCHW: Tensor) -> Tensor:
    """ITU-R 601 luma (cv2.COLOR_RGB2GRAY), shape (B, 1, H, W)."""
    r, g, b = x_BCHW.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b)[:, None]


def plasma_fractal(
    batch: int, mapsize: int, wibbledecay: float, *, like: Tensor, generator: torch.Generator | None
) -> Tensor:
    """Diamond-square height maps in [0, 1], shape (B, mapsize, mapsize), as the reference's fog draws
    them: each step sets new points to the mean of their neighbours plus uniform(-wibble, wibble) * wibble."""
    assert mapsize & (mapsize - 1) == 0, mapsize
    m = torch.zeros(batch, mapsize, mapsize, device=like.device)
    step, wibble = mapsize, 100.0

    def wibbled_mean(total: Tensor) -> Tensor:
        noise = rand(*total.shape, like=like, generator=generator) * 2 - 1
        return total / 4 + wibble * wibble * noise

    while step >= 2:
        half = step // 2
        corners = m[:, ::step, ::step]
        squares = corners + corners.roll(-1, 1)
        m[:, half::step, half::step] = wibbled_mean(squares + squares.roll(-1, 2))
        centres, corners = m[:, half::step, half::step], m[:, ::step, ::step]
        m[:, ::step, half::step] = wibbled_mean(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        m[:, half::step, ::step] = wibbled_mean(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        step, wibble = half, wibble / wibbledecay
    m -= m.amin((1, 2), keepdim=True)
    return m / m.amax((1, 2), keepdim=True)


# ---- OpenCV's 8-bit operations, on float tensors holding integer grey levels 0..255 (shape (B, 1, H, W))


def box3(x_BCHW: Tensor) -> Tensor:
    """cv2.blur(x, (3, 3)): the 3x3 mean, border reflect-101; sums first, as OpenCV (floors agree)."""
    ones = torch.ones(3, dtype=torch.float64)
    return separable(x_BCHW, ones, ones, "reflect") / 9  # integer sums: exact in float32


def canny(x_B1HW: Tensor, low: float, high: float) -> Tensor:
    """cv2.Canny(x, low, high) (3x3 Sobel, L1 magnitude) as a bool edge map."""
    smooth, diff = torch.tensor([1.0, 2.0, 1.0]), torch.tensor([-1.0, 0.0, 1.0])  # Sobel = smooth x diff
    gx = separable(x_B1HW, smooth, diff, "replicate").round().int()  # integer sums: exact in float32
    gy = separable(x_B1HW, diff, smooth, "replicate").round().int()
    mag = gx.abs() + gy.abs()
    m = F.pad(mag, (1, 1, 1, 1))  # magnitudes outside the image are 0
    h, w = mag.shape[-2:]

    def at(dy: int, dx: int) -> Tensor:
        return m[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    # Gradient direction sectors in OpenCV's fixed point: tan(22.5 deg) * 2^15, rounded.
    tg22x = gx.abs() * int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)
    y = gy.abs() << 15
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg22x + (gx.abs() << 16))
    anti = (gx * gy) < 0  # gradient signs differ: compare along the other diagonal
    diag_max = torch.where(anti, (mag > at(-1, 1)) & (mag > at(1, -1)), (mag > at(-1, -1)) & (mag > at(1, 1)))
    local_max = torch.where(
        horizontal,
        (mag > at(0, -1)) & (mag >= at(0, 1)),
        torch.where(vertical, (mag > at(-1, 0)) & (mag >= at(1, 0)), diag_max),
    )
    weak = local_max & (mag > int(low))
    edges = weak & (mag > int(high))
    while True:  # hysteresis: grow strong edges through 8-connected weak ones
        grown = weak & _dilate3(edges)
        if torch.equal(grown, edges):
            return edges
        edges = grown


def _dilate3(mask_B1HW: Tensor) -> Tensor:
    """Each pixel or any of its 8 neighbours is set (outside the image counts as unset)."""
    p = F.pad(mask_B1HW, (1, 1, 1, 1))
    rows = p[..., :-2, :] | p[..., 1:-1, :] | p[..., 2:, :]
    return rows[..., :-2] | rows[..., 1:-1] | rows[..., 2:]


# cv2.distanceTransform(DIST_L2, 5): the 5x5 chamfer mask's steps (dy, dx) and costs, one per +-pair.
_CHAMFER_5 = ((0, 1, 1.0), (1, 0, 1.0), (1, 1, 1.4), (1, -1, 1.4), (1, 2, 2.1969), (1, -2, 2.1969),
              (2, 1, 2.1969), (2, -1, 2.1969))  # fmt: skip


def chamfer_distance(zero_B1HW: Tensor, cap: int) -> Tensor:
    """Distance to the nearest True pixel under cv2's 5x5 chamfer metric, capped at ``cap``.

    A shortest path is a multiset of steps, and the cheapest one uses the two steps either side of its
    direction only, so it stays inside the box spanned by its ends (inside the image) in any order.
    The steps are therefore taken one direction at a time: min over t of d(p - t * step) + t * cost,
    for t up to ``cap / cost``, by doubling (shifts of 1, 2, 4, ... steps, both signs).
    """
    steps = []  # (dy, dx, cost) of each shifted copy, in the order they are taken
    for sy, sx, cost in _CHAMFER_5:
        shift = 1
        while shift * cost <= cap:
            steps += [(sign * shift * sy, sign * shift * sx, shift * cost) for sign in (1, -1)]
            shift *= 2
    pad = max(max(abs(dy), abs(dx)) for dy, dx, _ in steps)
    inf = float(cap) + 1
    d = F.pad(torch.where(zero_B1HW, 0.0, inf), (pad, pad, pad, pad), value=inf)
    h, w = zero_B1HW.shape[-2:]
    inner = d[..., pad : pad + h, pad : pad + w]
    for dy, dx, cost in steps:  # in place: a value read after its update is still some path's cost
        torch.minimum(inner, d[..., pad - dy : pad - dy + h, pad - dx : pad - dx + w] + cost, out=inner)
    return inner.clamp(max=cap)


def equalize_hist(x_B1HW: Tensor) -> Tensor:
    """cv2.equalizeHist per image: levels map to round(255 * (cdf - cdf_min) / (n - cdf_min))."""
    b = x_B1HW.shape[0]
    levels = x_B1HW.reshape(b, -1).long()
    ones = torch.ones_like(levels, dtype=torch.float32)
    hist = torch.zeros(b, 256, device=x_B1HW.device).scatter_add_(1, levels, ones)
    first = hist.gather(1, (hist > 0).long().argmax(1, keepdim=True))
    total = levels.shape[1]
    scale = 255.0 / (total - first).clamp_min(1)
    lut = ((hist.cumsum(1) - first) * scale).round().clamp(0, 255)
    lut = torch.where(first == total, torch.arange(256.0, device=x_B1HW.device), lut)  # one level: kept
    return lut.gather(1, levels).view_as(x_B1HW)
