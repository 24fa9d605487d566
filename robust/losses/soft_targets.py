"""Compact teacher targets: the teacher's k largest log-probabilities instead of all K logits, as FKD (Shen &
Xing, ECCV 2022) stores soft labels and Megatron-LM's offline distillation stores teacher log-probs.

The KD losses (``robust.losses.kd.kd_loss`` and the objectives built on it) take logits and apply
``log_softmax(logits / tau)``; log-probabilities are valid logits (``softmax(log p) = p``, and
``softmax(log p / tau)`` is the teacher's tempered distribution), so ``dense_log_probs`` feeds them unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# The least rest mass dense_log_probs assumes: the resolution of 1 - sum(p) in float32.
REST_FLOOR = torch.finfo(torch.float32).eps


def topk_soft_targets(logits_BK: Tensor, *, k: int) -> tuple[Tensor, Tensor]:
    """``(index_Bk, logp_Bk)``: the classes (int64) of the teacher's ``k`` largest probabilities and their
    log-probabilities (float32, ``log_softmax`` at temperature 1), largest first."""
    classes = logits_BK.shape[-1]
    if not 1 <= k <= classes:
        raise ValueError(f"top-k soft targets need 1 <= k <= {classes} (the number of classes), got k={k}")
    logp_Bk, index_Bk = F.log_softmax(logits_BK.float(), dim=-1).topk(k, dim=-1)
    return index_Bk, logp_Bk


def dense_log_probs(index_Bk: Tensor, logp_Bk: Tensor, *, num_classes: int) -> Tensor:
    """The full log-distribution ``logp_BK`` (float32) from a top-k: the k given entries as they are, and the
    rest of the mass, ``1 - sum(exp(logp_Bk))``, spread uniformly over the other ``num_classes - k`` classes
    (FKD's marginal smoothing).

    Guards: with k == K there is no other class and every entry is a given one. A rest mass below
    ``REST_FLOOR`` (float32's eps, the resolution of ``1 - sum`` in float32; the rest rounds to <= 0 when the
    kept entries hold all the mass to their precision, e.g. float16 log-probs of a confident row) is taken
    as ``REST_FLOOR``: its log stays finite (a -inf teacher entry makes the KL's ``0 * (log 0 - log q)``
    NaN), and the tail is not erased, which matters to the tempered targets: at tau = 4 a rest of 1e-7
    spread over 995 classes still holds most of ``softmax(log p / tau)`` (each class (1e-10)^(1/4) = 3e-3
    against the top class's ~1). The floor can make the total exceed 1 by at most eps; the KD losses'
    ``log_softmax`` renormalizes it.
    """
    if index_Bk.shape != logp_Bk.shape:
        raise ValueError(f"top-k index {tuple(index_Bk.shape)} and log-probs {tuple(logp_Bk.shape)} differ; "
                         "both must be (B, k) from topk_soft_targets")
    k = index_Bk.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"a top-{k} of {num_classes} classes needs 1 <= k <= num_classes")
    logp_Bk = logp_Bk.float()
    rest_B1 = (1 - logp_Bk.exp().sum(-1, keepdim=True)).clamp_min(REST_FLOOR)
    others = max(num_classes - k, 1)  # k == K: the fill is overwritten everywhere below
    fill_B1 = rest_B1.log() - math.log(others)
    return fill_B1.expand(len(logp_Bk), num_classes).scatter(-1, index_Bk.long(), logp_Bk)
