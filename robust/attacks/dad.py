"""Discrete adversarial samples (DAD, seed 000; SPEC section 4).

    x0 = Q(x); random start; x1 = PGD on CE(model(.), y) inside the eps-ball around Q(x); x_dad = Q(x1)

DAD attacks the frozen teacher, so samples can be made on the teacher pool, away from the student.
The DAT baseline (Mao et al. 2022) is the same procedure with the student as ``model``:
``dad_samples(student, discretize, x, y, cfg)``; there is no separate function for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robust.attacks.pgd import PGDConfig, pgd
from robust.losses.kd import soft_ce


@dataclass
class DADConfig(PGDConfig):
    """The official DAD budget: one normalised L2 step of 0.1 (0.01 in the offline script).

    At small image sizes scale eps/alpha to the discretizer's own error (SPEC 4, local reference).
    """

    norm: str = "l2"
    eps: float = 0.1
    alpha: float = 0.1
    steps: int = 1
    random_start_prob: float = 0.8
    random_start_scale: float = 0.1


def dad_samples(
    model: nn.Module,
    discretize: Callable[[Tensor], Tensor],
    x_BCHW: Tensor,
    y_B: Tensor,
    cfg: DADConfig,
    *,
    generator: torch.Generator | None = None,
    precision: str = "auto",
) -> Tensor:
    """Return Q(PGD(Q(x))): the attack maximises ``CE(model(x), y)`` around Q(x), then re-discretizes.

    ``discretize`` maps [0, 1] images to [0, 1] images (the VQGAN round trip); it runs without
    gradient and brings its own precision: pass the same policy to both, e.g.
    ``dad_samples(teacher, partial(discretize, vqgan, precision=p), x, y, cfg, precision=p)``.
    ``precision`` is the attack's (``pgd``): the model's forward and backward, not the step.
    ``model`` should be in eval mode; only the input gradient is taken.
    ``y_B`` may be hard labels (B,) or soft targets (B, K).
    """
    with torch.no_grad():
        x0 = discretize(x_BCHW)
    x1 = pgd(lambda x, y: soft_ce(model(x), y), x0, y_B, cfg, center=x0, generator=generator, precision=precision)
    with torch.no_grad():
        return discretize(x1)
