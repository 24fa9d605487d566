"""RPT's uncertainty-aware distillation loss (seed 002, eq. 3-5) and its one-head variants.

Per sample, beta = 1 for a clean sample and 0 for an augmented one (eq. 5):
  clean (eq. 3):     CE + KD to the clean teacher, for the clean head and the combined head
  augmented (eq. 4): CE + KD to the small robust teacher, for the unclean head and the combined head
The clean teacher is the frozen copy of the initial large model. KD is Hinton's tau^2 KL(p_T || p_S)
(``kd_loss``); the paper sums CE and KD unweighted and does not state tau, so ``tau`` defaults to the
project's 4. Whichever heads the student has get this routing: the clean head sees clean samples, the
unclean head augmented ones, the combined head all of them. So one function covers RPT (three heads),
single-teacher (combined only), Only-KD (combined only, the robust teacher for every sample), APT and
the "w/o K.D." ablation (``kd_weight=0``).

The loss is the batch mean over samples; ``terms`` holds detached per-batch sums and counts
(``ce_<head>``, ``kd_<head>``, ``n_<head>``, ``loss``, ``n``) for cross-rank reduction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from robust.losses.kd import kd_loss, soft_ce

TEACHERS = ("initial", "robust")


@dataclass
class RptLossConfig:
    tau: float = 4.0
    kd_weight: float = 1.0  # eq. 3-4 add CE and KD unweighted; 0 = CE only (APT, "w/o K.D.")
    clean_teacher: str = "initial"  # teacher of clean samples: "initial" (eq. 3) or "robust" (Only-KD)


def _rows(head: str, is_aug_B: Tensor) -> Tensor:
    if head == "clean":
        return ~is_aug_B
    if head == "unclean":
        return is_aug_B
    return torch.ones_like(is_aug_B)


def _check(cfg: RptLossConfig, logits: Mapping[str, Tensor], t_init: Tensor | None, t_robust: Tensor | None) -> None:
    if cfg.tau <= 0 or cfg.kd_weight < 0:
        raise ValueError(f"rpt loss needs tau > 0 and kd_weight >= 0, got tau={cfg.tau}, kd_weight={cfg.kd_weight}")
    if cfg.clean_teacher not in TEACHERS:
        raise ValueError(f"clean_teacher={cfg.clean_teacher!r} is unknown; use one of {list(TEACHERS)}")
    unknown = set(logits) - {"clean", "unclean", "combined"}
    if not logits or unknown:
        raise ValueError(f"head logits {sorted(logits)} must be named clean, unclean or combined")
    needs_init = cfg.kd_weight > 0 and cfg.clean_teacher == "initial"
    if cfg.kd_weight > 0 and (t_robust is None or (needs_init and t_init is None)):
        missing = "t_robust_logits" if t_robust is None else "t_init_logits"
        raise ValueError(f"KD (kd_weight={cfg.kd_weight}) needs {missing}; pass it or set kd_weight=0")


def rpt_loss(
    logits: Mapping[str, Tensor],
    y: Tensor,
    *,
    is_aug_B: Tensor,
    t_init_logits: Tensor | None,
    t_robust_logits: Tensor | None,
    cfg: RptLossConfig,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 5 over a batch of clean and augmented samples; returns (batch-mean loss, per-batch sums).

    ``logits`` maps head names to (B, K); ``y`` is hard labels (B,) or soft targets (B, K);
    ``is_aug_B`` marks augmented samples (beta = 0). The teacher logits are (B, K); only their rows
    of the samples they teach are read, so the other rows may hold anything (e.g. zeros).
    """
    _check(cfg, logits, t_init_logits, t_robust_logits)
    is_aug_B = is_aug_B.bool()
    batch = len(is_aug_B)
    clean_teacher = t_robust_logits if cfg.clean_teacher == "robust" else t_init_logits
    total = torch.zeros((), device=is_aug_B.device)
    terms: dict[str, Tensor] = {}
    for head, s_BK in logits.items():
        rows = _rows(head, is_aug_B)
        n = int(rows.sum())
        # a head without samples in this batch still gets a (zero) gradient: ranks stay in step
        ce = soft_ce(s_BK[rows], y[rows]) * n if n else s_BK.sum() * 0
        kd = torch.zeros((), device=s_BK.device)
        if cfg.kd_weight > 0:  # each sample distils from its own teacher: eq. 3 (clean) or eq. 4 (augmented)
            for teacher, sel in ((clean_teacher, rows & ~is_aug_B), (t_robust_logits, rows & is_aug_B)):
                m = int(sel.sum())
                if m:
                    kd = kd + kd_loss(s_BK[sel], teacher[sel], cfg.tau) * m
        total = total + ce + cfg.kd_weight * kd
        count = torch.tensor(float(n), device=s_BK.device)
        terms |= {f"ce_{head}": ce.detach(), f"kd_{head}": kd.detach(), f"n_{head}": count}
    loss = total / batch
    terms |= {"loss": total.detach(), "n": torch.tensor(float(batch), device=total.device)}
    return loss, terms
