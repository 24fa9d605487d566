"""Procedural IFS fractals: the built-in PixMix mixing set (PixMix, Hendrycks et al. 2022, uses fractals).

An iterated function system is N affine maps w_i(x) = A_i x + b_i with contractive A_i; its attractor
is rendered by the chaos game (apply a map drawn with probability p_i, over and over). The maps are
drawn as in Anderson & Farrell 2022 ("Improving fractal pre-training"): A = R(theta) diag(s1, s2)
R(phi) D with a random reflection D, and the "sigma factor" sum_i (s1_i + 2 s2_i) uniform in
[(5 + N) / 2, (6 + N) / 2], the range where attractors are neither dust nor blobs; p_i ~ |det A_i|.
Colour: each map has a random hue and a point's colour is the running mean of the maps' colours that
moved it (as fractal flames colour); brightness is the log point density. All fractals of a call are
rendered together, vectorised in torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_STEPS = 64  # chaos-game steps per chain; more points come from more parallel chains
_MAX_POINTS = 2**23  # points held at once (x 5 floats); bounds memory for large images
_MARGIN = 0.05  # border left free around the attractor, as a fraction of the image


@dataclass
class FractalConfig:
    """Random IFS fractals. ``min_coverage``: a fractal lighting up less of its image is redrawn
    (up to ``max_redraws`` times), which removes the rare attractors that collapse to a line."""

    min_maps: int = 2
    max_maps: int = 4
    points_per_pixel: float = 4.0
    min_coverage: float = 0.05
    max_redraws: int = 10


def render_fractals(n: int, size: int | tuple[int, int], cfg: FractalConfig | None = None, *,
                    generator: torch.Generator) -> Tensor:
    """``n`` random IFS fractals as uint8 RGB images (n, 3, H, W) on black, deterministic given
    ``generator``'s state (a CPU generator)."""
    cfg = cfg or FractalConfig()
    height, width = (size, size) if isinstance(size, int) else size
    if n < 1 or height < 1 or width < 1:
        raise ValueError(f"need n >= 1 fractals of a positive size, got n={n}, size={size}")
    if not 1 <= cfg.min_maps <= cfg.max_maps or cfg.points_per_pixel <= 0:
        raise ValueError("FractalConfig needs 1 <= min_maps <= max_maps and points_per_pixel > 0")
    points = max(_STEPS, math.ceil(cfg.points_per_pixel * height * width))
    chunk = max(1, _MAX_POINTS // points)
    images = torch.cat([_render_valid(min(chunk, n - i), height, width, points, cfg, generator)
                        for i in range(0, n, chunk)])
    return images.mul(255).round().to(torch.uint8)


def sample_ifs(n: int, cfg: FractalConfig, *, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` random IFS as (A (n, M, 2, 2), b (n, M, 2), p (n, M)), M = max_maps; maps past a
    system's own count have p = 0."""
    g, m = generator, cfg.max_maps
    num_maps = torch.randint(cfg.min_maps, m + 1, (n,), generator=g)
    active_NM = torch.arange(m) < num_maps[:, None]
    # sigma factor uniform in [(5 + N) / 2, (6 + N) / 2], shared out among the maps at random
    sigma_factor = (5 + num_maps + torch.rand(n, generator=g)) / 2
    share_NM = torch.rand(n, m, generator=g).add(0.1) * active_NM
    share_NM = share_NM / share_NM.sum(1, keepdim=True)
    ratio_NM = 0.2 + 0.8 * torch.rand(n, m, generator=g)  # s2 / s1
    s1 = (sigma_factor[:, None] * share_NM / (1 + 2 * ratio_NM)).clamp(0.05, 0.95)
    s2 = ratio_NM * s1
    theta, phi = (2 * math.pi * torch.rand(n, m, generator=g) for _ in range(2))
    signs = torch.randint(0, 2, (n, m, 2), generator=g).float() * 2 - 1
    a = _rotation(theta) @ torch.diag_embed(torch.stack([s1, s2], -1)) @ _rotation(phi) @ torch.diag_embed(signs)
    b = torch.rand(n, m, 2, generator=g) * 2 - 1
    p = (s1 * s2) * active_NM
    return a, b, p / p.sum(1, keepdim=True)


def render_ifs(a: Tensor, b: Tensor, p: Tensor, height: int, width: int, *, points: int,
               generator: torch.Generator) -> Tensor:
    """Chaos-game renders of the IFS ``(a, b, p)`` as float RGB (n, 3, H, W) in [0, 1]."""
    g, (n, m) = generator, p.shape
    chains = math.ceil(points / _STEPS)
    rows = torch.arange(n)[:, None]
    hue = torch.rand(n, m, generator=g)
    colour_NM3 = _hue_to_rgb(hue)
    # Start every chain at the fixed point of map 0, (I - A_0)^-1 b_0: it lies on the attractor, so
    # every rendered point does too and no burn-in is needed.
    start = torch.linalg.solve(torch.eye(2) - a[:, 0], b[:, 0])
    x_NP2 = start[:, None].expand(n, chains, 2).contiguous()
    c_NP3 = colour_NM3[:, :1].expand(n, chains, 3).contiguous()
    xs, cs = [], []
    for _ in range(_STEPS):
        k_NP = torch.multinomial(p, chains, replacement=True, generator=g)
        x_NP2 = torch.einsum("npij,npj->npi", a[rows, k_NP], x_NP2) + b[rows, k_NP]
        c_NP3 = (c_NP3 + colour_NM3[rows, k_NP]) / 2
        xs.append(x_NP2)
        cs.append(c_NP3)
    return _rasterize(torch.cat(xs, 1), torch.cat(cs, 1), height, width)


def _render_valid(n: int, height: int, width: int, points: int, cfg: FractalConfig,
                  generator: torch.Generator) -> Tensor:
    images = render_ifs(*sample_ifs(n, cfg, generator=generator), height, width, points=points, generator=generator)
    for _ in range(cfg.max_redraws):
        sparse = (images.amax(1) > 0).float().mean((1, 2)) < cfg.min_coverage
        if not sparse.any():
            break
        redraw = render_ifs(*sample_ifs(int(sparse.sum()), cfg, generator=generator), height, width,
                            points=points, generator=generator)
        images[sparse] = redraw
    return images


def _rasterize(x_NP2: Tensor, c_NP3: Tensor, height: int, width: int) -> Tensor:
    """Points -> per-pixel point counts and mean colours, the attractor fitted into the image."""
    n = len(x_NP2)
    lo, hi = x_NP2.amin(1, keepdim=True), x_NP2.amax(1, keepdim=True)
    extent = (hi - lo).clamp_min(1e-6)
    scale = (1 - 2 * _MARGIN) * torch.minimum(width / extent[..., 0], height / extent[..., 1])  # keep the aspect
    centre = (lo + hi) / 2
    col = ((x_NP2[..., 0] - centre[..., 0]) * scale + width / 2).long().clamp(0, width - 1)
    row = ((x_NP2[..., 1] - centre[..., 1]) * scale + height / 2).long().clamp(0, height - 1)
    flat = (torch.arange(n)[:, None] * height + row) * width + col
    count = torch.zeros(n * height * width).index_add_(0, flat.flatten(), torch.ones(flat.numel()))
    colour = torch.zeros(n * height * width, 3).index_add_(0, flat.flatten(), c_NP3.reshape(-1, 3))
    count_NHW = count.view(n, height, width)
    brightness = count_NHW.log1p() / count_NHW.flatten(1).amax(1).log1p()[:, None, None]
    mean_colour_NHW3 = colour.view(n, height, width, 3) / count_NHW.clamp_min(1)[..., None]
    return (mean_colour_NHW3 * brightness[..., None]).permute(0, 3, 1, 2).clamp(0, 1)


def _rotation(angle: Tensor) -> Tensor:
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


def _hue_to_rgb(hue: Tensor) -> Tensor:
    """Fully saturated, full-value colours of the given hues in [0, 1) (HSV -> RGB)."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + hue[..., None] * 6) % 6
    return 1 - torch.minimum(k, 4 - k).clamp(0, 1)
