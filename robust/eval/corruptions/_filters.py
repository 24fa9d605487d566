"""Shared image operations for the corruption suite: seeded draws, padding, kernels, blurs and zooms.

Every function works on a batch on the tensor's own device. Padding modes are named after what they
reproduce: "replicate" (scipy "nearest"), "symmetric" (scipy "reflect", d c b a | a b c d) and
"reflect" (OpenCV's default BORDER_REFLECT_101, c b | a b c).
"""

from __future__ import annotations

import math

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


# ---- padding and convolution


def _pad_index(n: int, pad: int, mode: str, device: torch.device) -> Tensor:
    i = torch.arange(-pad, n + pad, device=device)
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


def pad2d(x: Tensor, ph: int, pw: int, mode: str) -> Tensor:
    """Pad the last two dims by ``ph`` rows and ``pw`` columns on each side; any pad size works."""
    rows = _pad_index(x.shape[-2], ph, mode, x.device)
    cols = _pad_index(x.shape[-1], pw, mode, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def filter2d(x_BCHW: Tensor, k_KK: Tensor, mode: str) -> Tensor:
    """Correlate every channel with the odd-sized kernel ``k_KK`` (OpenCV ``filter2D``), same size out."""
    b, c, h, w = x_BCHW.shape
    kh, kw = k_KK.shape
    y = pad2d(x_BCHW.reshape(b * c, 1, h, w), kh // 2, kw // 2, mode)
    return F.conv2d(y, k_KK.to(y).view(1, 1, kh, kw)).view(b, c, h, w)


def separable(x_BCHW: Tensor, k_rows: Tensor, k_cols: Tensor, mode: str) -> Tensor:
    """Correlate along H with ``k_rows`` then along W with ``k_cols``, padding each axis in its own pass."""
    b, c, h, w = x_BCHW.shape
    y = x_BCHW.reshape(b * c, 1, h, w)
    y = F.conv2d(pad2d(y, len(k_rows) // 2, 0, mode), k_rows.to(y).view(1, 1, -1, 1))
    y = F.conv2d(pad2d(y, 0, len(k_cols) // 2, mode), k_cols.to(y).view(1, 1, 1, -1))
    return y.view(b, c, h, w)


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
    along the angle (degrees), edges replicated; copies stop once a shift reaches the image size."""
    b, c, h, w = x_BCHW.shape
    width = 2 * radius + 1
    i = torch.arange(width, dtype=torch.float64, device=x_BCHW.device)
    weight = torch.exp(-(i**2) / (2 * sigma**2))
    weight = weight / weight.sum()
    rad = torch.deg2rad(angle_B.double())[:, None]
    py, px = width * torch.sin(rad), width * torch.cos(rad)
    hyp = torch.hypot(py, px)
    dy = -torch.ceil(i * py / hyp - 0.5).long()  # (B, width)
    dx = -torch.ceil(i * px / hyp - 0.5).long()
    inside = ((dy.abs() < h) & (dx.abs() < w)).long().cumprod(1)  # the reference breaks at the first miss
    weight_BK = (weight * inside).float()
    rows, cols = torch.arange(h, device=x_BCHW.device), torch.arange(w, device=x_BCHW.device)
    flat = x_BCHW.reshape(b, c, h * w)
    out = torch.zeros_like(flat)
    for k in range(width):
        r = (rows[None, :] - dy[:, k, None]).clamp(0, h - 1)
        q = (cols[None, :] - dx[:, k, None]).clamp(0, w - 1)
        idx = (r[:, :, None] * w + q[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
        out += weight_BK[:, k, None, None] * flat.gather(2, idx)
    return out.view(b, c, h, w)


def clipped_zoom(x_BCHW: Tensor, zoom: float) -> Tensor:
    """Centre crop of size ceil(n / zoom) scaled by ``zoom`` like scipy ``zoom(order=1)``: output size
    round(crop * zoom) >= the input size (callers crop it), corner-aligned linear interpolation."""
    h, w = x_BCHW.shape[-2:]
    ch, cw = math.ceil(h / zoom), math.ceil(w / zoom)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x_BCHW[..., top : top + ch, left : left + cw]
    size = (round(ch * zoom), round(cw * zoom))
    return F.interpolate(crop, size=size, mode="bilinear", align_corners=True)


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
    w = torch.tensor([0.299, 0.587, 0.114], device=x_BCHW.device, dtype=x_BCHW.dtype)
    return (x_BCHW * w.view(1, 3, 1, 1)).sum(1, keepdim=True)


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
    m = m - m.amin((1, 2), keepdim=True)
    return m / m.amax((1, 2), keepdim=True)


# ---- OpenCV's 8-bit operations, on float tensors holding integer grey levels 0..255 (shape (B, 1, H, W))


def box3(x_BCHW: Tensor) -> Tensor:
    """cv2.blur(x, (3, 3)): the 3x3 mean, border reflect-101; sums first, as OpenCV (floors agree)."""
    ones = torch.ones(3, dtype=torch.float64)
    return separable(x_BCHW, ones, ones, "reflect") / 9


def canny(x_B1HW: Tensor, low: float, high: float) -> Tensor:
    """cv2.Canny(x, low, high) (3x3 Sobel, L1 magnitude) as a bool edge map."""
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    p = pad2d(x_B1HW, 1, 1, "replicate")
    gx = F.conv2d(p, sobel.to(p).view(1, 1, 3, 3)).round().long()
    gy = F.conv2d(p, sobel.T.to(p).view(1, 1, 3, 3)).round().long()
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
        grown = weak & (F.max_pool2d(edges.float(), 3, 1, 1) > 0)
        if torch.equal(grown, edges):
            return edges
        edges = grown


# cv2.distanceTransform(DIST_L2, 5): the 5x5 chamfer mask's steps (dy, dx) and costs.
_CHAMFER_5 = [(dy, dx, 1.0) for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))]
_CHAMFER_5 += [(dy, dx, 1.4) for dy in (-1, 1) for dx in (-1, 1)]
_CHAMFER_5 += [(dy * a, dx * b, 2.1969) for dy in (-1, 1) for dx in (-1, 1) for a, b in ((1, 2), (2, 1))]


def chamfer_distance(zero_B1HW: Tensor, cap: int) -> Tensor:
    """Distance to the nearest True pixel under cv2's 5x5 chamfer metric, capped at ``cap``.

    Shortest paths by relaxation: every step costs >= 1, so ``cap`` rounds settle all distances <= cap.
    """
    inf = float(cap) + 1
    d = torch.where(zero_B1HW, 0.0, inf).to(torch.float32)
    h, w = d.shape[-2:]
    for _ in range(cap):
        p = F.pad(d, (2, 2, 2, 2), value=inf)
        steps = [p[..., 2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w] + cost for dy, dx, cost in _CHAMFER_5]
        d = torch.minimum(d, torch.stack(steps).amin(0))
    return d.clamp_max(cap)


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
