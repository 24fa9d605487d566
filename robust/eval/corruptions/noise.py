"""Noise corruptions: additive Gaussian, Poisson (shot), salt-and-pepper (impulse), multiplicative (speckle).

Per-severity parameters are imagecorruptions' (Hendrycks & Dietterich, ImageNet-C); noise is drawn per
pixel and channel from the caller's generator.
"""

from __future__ import annotations

import functools
import math

import torch

from robust.eval.corruptions import register
from robust.eval.corruptions._filters import poisson, rand, randn

Tensor = torch.Tensor


@register("gaussian_noise")
def gaussian_noise(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    std = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    return randn(*x.shape, like=x, generator=generator).mul_(std).add_(x)


@register("shot_noise")
def shot_noise(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    photons = (60, 25, 12, 5, 3)[severity - 1]  # photons per unit intensity: fewer is noisier
    return poisson_8bit(x, photons, generator=generator).div_(photons)


def poisson_8bit(x: Tensor, scale: float, *, generator: torch.Generator | None) -> Tensor:
    """Poisson(scale * x) draws, fast for images on the 8-bit grid (the reference's inputs are uint8).

    A Poisson variable is the sum of independent ones with the rates summing up, so the rate splits
    into its 8-bit level part, scale * g / 255, drawn from a Walker alias table per level (one uniform
    and two lookups, instead of torch.poisson's one-by-one rejection sampling), and the part
    above the level, drawn by torch.poisson only where it is not zero. Values within 1/1000 of a level
    count as on it.
    """
    g = torch.floor(x * 255 + 1e-3).clamp_(0, 255)
    prob, alias = _poisson_alias(scale / 255, x.device)
    n = len(prob) // 256
    # One uniform times n: its integer part picks a column of the level's table, its fraction decides
    # between the column and its alias (to 2^-24 * n, finer than the table's float32 probabilities).
    u = rand(*x.shape, like=x, generator=generator).mul_(n)
    j = u.floor()
    cell = g.mul(n).add_(j).long().reshape(-1)  # integers below 2^24: exact in float32
    keep = (u - j).view(-1) < prob.index_select(0, cell)
    k = torch.where(keep, j.view(-1), alias.index_select(0, cell)).view(x.shape)
    rest = x * 255 - g  # levels above the grid
    off_grid = rest > 1e-3
    if off_grid.any():
        k[off_grid] += poisson(rest[off_grid] * (scale / 255), generator=generator)
    return k


@functools.lru_cache(maxsize=16)
def _poisson_alias(step: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """Walker alias tables (Vose's construction) of Poisson(g * step) for g = 0..255: acceptance
    probabilities and aliases (as floats), each flat (256 * n,) for a power of two n past which less
    than 1e-12 is left."""
    k = torch.arange(1024, dtype=torch.float64)
    top = 255 * step
    tail = 1 - torch.exp(torch.xlogy(k, torch.tensor(top)) - top - torch.lgamma(k + 1)).cumsum(0)
    n = 1 << math.ceil(math.log2(int((tail >= 1e-12).sum()) + 1))
    k = k[:n]
    rate = torch.arange(256, dtype=torch.float64)[:, None] * step
    pmf = torch.exp(torch.xlogy(k, rate) - rate - torch.lgamma(k + 1))
    prob, alias = [], []
    for weights in (pmf / pmf.sum(1, keepdim=True) * n).tolist():
        accept, other = [1.0] * n, list(range(n))
        small = [i for i, w in enumerate(weights) if w < 1]
        large = [i for i, w in enumerate(weights) if w >= 1]
        while small and large:
            s, big = small.pop(), large.pop()
            accept[s], other[s] = weights[s], big
            weights[big] += weights[s] - 1
            (small if weights[big] < 1 else large).append(big)
        prob.append(accept)
        alias.append(other)
    return torch.tensor(prob, device=device).view(-1), torch.tensor(alias, dtype=torch.float32, device=device).view(-1)


@register("impulse_noise")
def impulse_noise(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    # skimage random_noise(mode="s&p"): each value flips with p=amount, to 1 or 0 with equal odds. One
    # uniform u decides both: it flips when u < amount, and given that, u < amount / 2 has odds 1/2.
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    u = rand(*x.shape, like=x, generator=generator)
    return torch.where(u < amount, (u < amount / 2).to(x.dtype), x)


@register("speckle_noise")
def speckle_noise(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    std = (0.15, 0.2, 0.35, 0.45, 0.6)[severity - 1]
    return randn(*x.shape, like=x, generator=generator).mul_(std).add_(1).mul_(x)  # x + x * std * n
