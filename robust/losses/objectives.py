"""Student objectives (SPEC section 4): CE, KD, DAD online / offline and the DAT baseline.

Every objective returns ``(loss, terms)``: ``loss`` is the batch-mean scalar to backpropagate and
``terms`` holds detached batch-mean components for logging (``kd*`` terms are ``kd_loss`` values,
i.e. tau^2 * KL, before weighting). "adv" logits are those of the extra batch made from the same
images: DAD samples (``dad_*``) or the student's discrete adversarial samples (``dat``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from robust.losses.kd import kd_loss, soft_ce

Terms = dict[str, Tensor]


@dataclass
class ObjectiveConfig:
    """The weights of the student losses (the kind is the method's: ``objective(kind, cfg, ...)``).

    ``kd_weight`` (kinds kd, dad_online) multiplies each ``tau^2 * KL`` term; 0.5 gives SPEC 4's
    ``tau^2 / 2``. The offline pair reproduces the official training script's
    ``0.75 CE + 4 KL(T || S)``: ``offline_kd_weight * tau^2 = 0.25 * 16 = 4`` (Hinton's
    ``(1 - a) CE + a tau^2 KL`` with a = 0.25). Label smoothing is part of the targets ``y``
    (``robust.train_transforms``), so the losses here take soft targets as they come.
    """

    tau: float = 4.0
    kd_weight: float = 0.5
    offline_ce_weight: float = 0.75
    offline_kd_weight: float = 0.25


def _ce(cfg: ObjectiveConfig, s: Tensor, y: Tensor) -> tuple[Tensor, Terms]:
    ce = soft_ce(s, y)
    return ce, {"ce": ce}


def _kd(cfg: ObjectiveConfig, s: Tensor, y: Tensor, *, t: Tensor) -> tuple[Tensor, Terms]:
    ce = soft_ce(s, y)
    kd = kd_loss(s, t, cfg.tau)
    return ce + cfg.kd_weight * kd, {"ce": ce, "kd_clean": kd}


def _dad_online(
    cfg: ObjectiveConfig, s: Tensor, y: Tensor, *, t: Tensor, s_adv: Tensor, t_adv: Tensor
) -> tuple[Tensor, Terms]:
    """CE(S(x), y) + (tau^2/2) KL(p_T(x) || p_S(x)) + (tau^2/2) KL(p_T(x_dad) || p_S(x_dad))."""
    ce = soft_ce(s, y)
    kd_clean, kd_adv = kd_loss(s, t, cfg.tau), kd_loss(s_adv, t_adv, cfg.tau)
    loss = ce + cfg.kd_weight * (kd_clean + kd_adv)
    return loss, {"ce": ce, "kd_clean": kd_clean, "kd_adv": kd_adv}


def _dad_offline(
    cfg: ObjectiveConfig, s: Tensor, y: Tensor, *, t: Tensor, s_adv: Tensor, t_adv: Tensor
) -> tuple[Tensor, Terms]:
    """Clean and DAD batches concatenated: 0.75 CE + 0.25 tau^2 KL, KL batch-mean over both."""
    s_all, t_all, y_all = torch.cat([s, s_adv]), torch.cat([t, t_adv]), torch.cat([y, y])
    ce = soft_ce(s_all, y_all)
    kd = kd_loss(s_all, t_all, cfg.tau)
    return cfg.offline_ce_weight * ce + cfg.offline_kd_weight * kd, {"ce": ce, "kd": kd}


def _dat(cfg: ObjectiveConfig, s: Tensor, y: Tensor, *, s_adv: Tensor) -> tuple[Tensor, Terms]:
    """DAT (Mao et al. 2022): CE on the clean batch + CE on its discrete adversarial batch."""
    ce_clean, ce_adv = soft_ce(s, y), soft_ce(s_adv, y)
    return ce_clean + ce_adv, {"ce_clean": ce_clean, "ce_adv": ce_adv}


# kind -> (function, the optional inputs it needs)
_KINDS: dict[str, tuple[Callable[..., tuple[Tensor, Terms]], tuple[str, ...]]] = {
    "ce": (_ce, ()),
    "kd": (_kd, ("t",)),
    "dad_online": (_dad_online, ("t", "s_adv", "t_adv")),
    "dad_offline": (_dad_offline, ("t", "s_adv", "t_adv")),
    "dat": (_dat, ("s_adv",)),
}
_ARG_NAMES = {"t": "teacher_logits", "s_adv": "student_adv_logits", "t_adv": "teacher_adv_logits"}


KINDS = tuple(_KINDS)


def objective(
    kind: str,
    cfg: ObjectiveConfig,
    *,
    student_logits: Tensor,
    y: Tensor,
    teacher_logits: Tensor | None = None,
    student_adv_logits: Tensor | None = None,
    teacher_adv_logits: Tensor | None = None,
) -> tuple[Tensor, Terms]:
    """The student loss ``kind`` on one batch; inputs the kind does not use are ignored.

    All logits are (B, K); ``y`` is hard labels (B,) or soft targets (B, K), shared by the clean
    and the adv batch. Teacher logits may be fp16; everything is computed in fp32.
    """
    if kind not in _KINDS:
        raise ValueError(f"objective kind {kind!r} is unknown; use one of {sorted(_KINDS)}")
    if cfg.tau <= 0:
        raise ValueError(f"objective tau={cfg.tau} must be > 0")
    fn, needs = _KINDS[kind]
    given = {"t": teacher_logits, "s_adv": student_adv_logits, "t_adv": teacher_adv_logits}
    missing = [_ARG_NAMES[k] for k in needs if given[k] is None]
    if missing:
        raise ValueError(f"objective {kind!r} needs {', '.join(missing)}; pass them to objective()")
    loss, terms = fn(cfg, student_logits, y, **{k: given[k] for k in needs})
    return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}
