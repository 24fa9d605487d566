"""Projected gradient ascent on an input loss (PGD, Madry et al. 2018), L2 or Linf, per sample.

Only the input gradient is taken (``torch.autograd.grad``), so a model's parameters never
accumulate ``.grad`` and frozen teachers need no ``requires_grad``. The loss runs under the
precision policy (``robust.models.precision``); the step arithmetic always runs in fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from robust.models.precision import autocast

NORMS = ("l2", "linf")
_TINY = 1e-12  # guards the division by a zero gradient or a zero perturbation


@dataclass
class PGDConfig:
    """PGD budget. ``random_start_scale`` is the L2 radius of the random start (unused for Linf,
    whose random start is uniform in the eps-box)."""

    norm: str = "linf"
    eps: float = 4 / 255
    alpha: float = 1 / 255
    steps: int = 10
    random_start_prob: float = 1.0
    random_start_scale: float = 0.1


def check_pgd_config(cfg: PGDConfig, *, key: str = "attack") -> None:
    """Raise ``ValueError`` for a budget the attack cannot run with, naming the config ``key``'s fields."""
    if cfg.norm not in NORMS:
        raise ValueError(f"{key}.norm={cfg.norm!r} is unknown; use one of {NORMS}")
    if cfg.eps < 0 or cfg.alpha < 0 or cfg.random_start_scale < 0:
        raise ValueError(f"{key}.eps, {key}.alpha and {key}.random_start_scale must be >= 0")
    if cfg.steps < 1:
        raise ValueError(f"{key}.steps={cfg.steps}; use at least 1 step")
    if not 0.0 <= cfg.random_start_prob <= 1.0:
        raise ValueError(f"{key}.random_start_prob={cfg.random_start_prob} must lie in [0, 1]")


def _per_sample_l2(t_BCHW: Tensor) -> Tensor:
    """L2 norm of each sample, shaped (B, 1, 1, 1) for broadcasting."""
    return t_BCHW.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, *([1] * (t_BCHW.dim() - 1)))


def random_start(x_BCHW: Tensor, cfg: PGDConfig, *, generator: torch.Generator | None = None) -> Tensor:
    """With probability ``random_start_prob`` per sample add noise (SPEC 4), then clip to [0, 1].

    L2: ``scale * eta / ||eta||_2`` with Gaussian eta; Linf: uniform in [-eps, eps].
    """
    shape, kw = x_BCHW.shape, dict(generator=generator, device=x_BCHW.device, dtype=x_BCHW.dtype)
    if cfg.norm == "l2":
        eta = torch.randn(shape, **kw)
        noise = cfg.random_start_scale * eta / _per_sample_l2(eta)
    else:
        noise = (2 * torch.rand(shape, **kw) - 1) * cfg.eps
    chosen_B = torch.rand(shape[0], **kw) < cfg.random_start_prob
    noise = noise * chosen_B.view(-1, *([1] * (len(shape) - 1)))
    return (x_BCHW + noise).clamp(0.0, 1.0)


def project(x_BCHW: Tensor, center_BCHW: Tensor, cfg: PGDConfig) -> Tensor:
    """Project each sample onto the eps-ball around ``center`` and clip to [0, 1].

    Clipping after projection stays in the ball: with ``center`` in [0, 1] it only moves
    coordinates towards the center.
    """
    delta = x_BCHW - center_BCHW
    if cfg.norm == "l2":
        delta = delta * (cfg.eps / _per_sample_l2(delta)).clamp(max=1.0)
    else:
        delta = delta.clamp(-cfg.eps, cfg.eps)
    return (center_BCHW + delta).clamp(0.0, 1.0)


def pgd(
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x_BCHW: Tensor,
    y_B: Tensor,
    cfg: PGDConfig,
    *,
    center: Tensor | None = None,
    generator: torch.Generator | None = None,
    precision: str = "auto",
) -> Tensor:
    """Maximise the scalar ``loss_fn(x, y)`` over the eps-ball around ``center`` (default ``x``).

    Each step: L2 ``x + alpha * g / ||g||_2`` per sample, Linf ``x + alpha * sign(g)``; then
    project and clip to [0, 1]. The random start is drawn around ``x``. Returns a detached fp32 tensor.
    ``y_B`` is passed through to ``loss_fn`` (hard labels or soft targets).
    ``loss_fn`` runs under ``autocast(precision)``, so its forward and backward are bf16 where the
    policy says so; ``x``, ``g`` and the step, projection and clipping stay fp32: DAD's L2 step of 0.1
    over 3x224x224 pixels moves each by about 3e-4, far below bf16's spacing of 2^-8 on [0.5, 1).
    """
    check_pgd_config(cfg)
    center = (x_BCHW if center is None else center).detach().float()
    x_adv = x_BCHW.detach().float()
    if cfg.random_start_prob > 0:
        x_adv = random_start(x_adv, cfg, generator=generator)
    for _ in range(cfg.steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():  # callers may sit under no_grad (e.g. the teacher pool)
            with autocast(precision, device=x_adv.device):
                loss = loss_fn(x_adv, y_B)
            (g,) = torch.autograd.grad(loss, x_adv)  # fp32 like x_adv: autocast's casts return it so
        with torch.no_grad():
            step = g / _per_sample_l2(g) if cfg.norm == "l2" else g.sign()
            x_adv = project(x_adv + cfg.alpha * step, center, cfg)
    return x_adv.detach()
