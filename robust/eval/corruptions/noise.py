"""Noise corruptions: additive Gaussian, Poisson (shot), salt-and-pepper (impulse), multiplicative (speckle).

Per-severity parameters are imagecorruptions' (Hendrycks & Dietterich, ImageNet-C); noise is drawn per
pixel and channel from the caller's generator.
"""

from __future__ import annotations

import torch

from robust.eval.corruptions import register
from robust.eval.corruptions._filters import poisson, rand, randn

Tensor = torch.Tensor


@register("gaussian_noise")
def gaussian_noise(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    std = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    return x + std * randn(*x.shape, like=x, generator=generator)


@register("shot_noise")
def shot_noise(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    photons = (60, 25, 12, 5, 3)[severity - 1]  # photons per unit intensity: fewer is noisier
    return poisson(x * photons, generator=generator) / photons


@register("impulse_noise")
def impulse_noise(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    # skimage random_noise(mode="s&p"): each value flips with p=amount, to 1 or 0 with equal odds.
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    flipped = rand(*x.shape, like=x, generator=generator) < amount
    salted = rand(*x.shape, like=x, generator=generator) < 0.5
    return torch.where(flipped, salted.to(x.dtype), x)


@register("speckle_noise")
def speckle_noise(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    std = (0.15, 0.2, 0.35, 0.45, 0.6)[severity - 1]
    return x + x * std * randn(*x.shape, like=x, generator=generator)
