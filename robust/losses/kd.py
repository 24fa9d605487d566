"""Distillation and cross-entropy losses, always computed in fp32 (teacher targets may arrive as fp16)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def kd_loss(student_logits_BK: Tensor, teacher_logits_BK: Tensor, tau: float) -> Tensor:
    """Hinton et al. (2015): ``tau^2 * KL(softmax(t / tau) || softmax(s / tau))``, mean over the batch.

    The tau^2 factor keeps the gradient scale independent of the temperature.
    """
    if student_logits_BK.shape != teacher_logits_BK.shape:
        raise ValueError(
            f"student logits {tuple(student_logits_BK.shape)} and teacher logits "
            f"{tuple(teacher_logits_BK.shape)} differ; both must be (B, K) over the same classes"
        )
    log_p_s = F.log_softmax(student_logits_BK.float() / tau, dim=1)
    log_p_t = F.log_softmax(teacher_logits_BK.float() / tau, dim=1)
    return tau**2 * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def soft_ce(logits_BK: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy against soft targets (B, K) (mixup, CutMix, label smoothing: all made with the
    targets by ``robust.train_transforms``) or hard labels (B,), batch mean."""
    return F.cross_entropy(logits_BK.float(), target.float() if target.dim() == 2 else target)
