"""RPT's uncertainty-aware head selection at inference (seed 002, eq. 6 and appendix A.1).

The frozen backbone runs once; the tuned part (whose dropout layers are the only random ones) runs
K times with dropout on: Monte-Carlo dropout. Per head, p = the mean of the K softmax outputs and
U_mc = their standard deviation (over the K passes, at the head's predicted class). Eq. 6:
h_f = argmin over {clean, unclean} of U_mc * KL(p_combined || p_head). Ablations (``rule``): "no_kl"
(U_mc alone), "no_umc" (KL alone), "max_logit" (the head with the larger maximum mean logit). Ties go
to the clean head. The prediction is the chosen head's MC-mean distribution, returned as log-probs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robust.eval.metrics import Key, Tally, classification_tally, routing_tally
from robust.rpt.partial import HEADS, PartialModel

RULES = ("umc_kl", "no_kl", "no_umc", "max_logit")


@dataclass
class SelectConfig:
    passes: int = 10  # K Monte-Carlo dropout passes (paper appendix G: 10)
    rule: str = "umc_kl"  # eq. 6; ablations: no_kl, no_umc, max_logit


class Selection(NamedTuple):
    chose_clean_B: Tensor  # bool: the clean head was picked
    logits_BK: Tensor  # log of the picked head's MC-mean probabilities
    score: dict[str, Tensor]  # per head (clean, unclean): the score_B that was minimised


def check_select_config(cfg: SelectConfig) -> None:
    if cfg.passes < 2:
        raise ValueError(f"passes={cfg.passes}: U_mc is a standard deviation over MC passes, "
                         "so it needs >= 2 (paper: 10)")  # fmt: skip
    if cfg.rule not in RULES:
        raise ValueError(f"rule={cfg.rule!r} is unknown; use one of {list(RULES)}")


@contextmanager
def mc_dropout(module: nn.Module) -> Iterator[None]:
    """Everything in eval mode (BatchNorm uses its statistics) except the dropout layers (and MHA's dropout)."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    for m in module.modules():
        if isinstance(m, (nn.Dropout, nn.MultiheadAttention)):
            m.train()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def mc_head_logits(student: PartialModel, feats: Tensor, *, passes: int) -> dict[str, Tensor]:
    """(K, B, C) logits per head: ``passes`` dropout-on runs of the tuned part on the same features."""
    with mc_dropout(student.tuned), torch.no_grad():
        runs = [student.heads_forward(feats) for _ in range(passes)]
    return {name: torch.stack([r[name] for r in runs]) for name in student.head_names}


def _mean_and_umc(logits_KBC: Tensor) -> tuple[Tensor, Tensor]:
    probs_KBC = logits_KBC.float().softmax(dim=-1)
    mean_BC = probs_KBC.mean(dim=0)
    pred_B = mean_BC.argmax(dim=-1)
    umc_B = probs_KBC.std(dim=0).gather(1, pred_B[:, None])[:, 0]
    return mean_BC, umc_B


def _log(p_BC: Tensor) -> Tensor:
    return p_BC.clamp_min(torch.finfo(p_BC.dtype).tiny).log()


def select_heads(mc_logits: Mapping[str, Tensor], *, rule: str = "umc_kl") -> Selection:
    """Pick the clean or the unclean head per sample from (K, B, C) MC logits of all three heads."""
    check_select_config(SelectConfig(passes=min(len(v) for v in mc_logits.values()), rule=rule))
    if set(mc_logits) != set(HEADS):
        raise ValueError(f"head selection needs the heads {list(HEADS)}; got {sorted(mc_logits)}")
    mean_m, _ = _mean_and_umc(mc_logits["combined"])
    means, score = {}, {}
    for head in ("clean", "unclean"):
        means[head], umc = _mean_and_umc(mc_logits[head])
        kl = F.kl_div(_log(means[head]), _log(mean_m), log_target=True, reduction="none").sum(dim=-1)
        score[head] = {"umc_kl": umc * kl, "no_kl": umc, "no_umc": kl,
                       "max_logit": -mc_logits[head].float().mean(dim=0).amax(dim=-1)}[rule]  # fmt: skip
    chose_clean = score["clean"] <= score["unclean"]
    logits = torch.where(chose_clean[:, None], _log(means["clean"]), _log(means["unclean"]))
    return Selection(chose_clean, logits, score)


def predict(student: PartialModel, x01_BCHW: Tensor, *, cfg: SelectConfig) -> Selection:
    """Eq. 6 inference: the backbone once, ``cfg.passes`` MC-dropout passes through the tuned part."""
    check_select_config(cfg)
    return select_heads(mc_head_logits(student, student.backbone_features(x01_BCHW), passes=cfg.passes), rule=cfg.rule)


def selection_tally(sel: Selection, y_B: Tensor, *, key: Key, shifted: bool) -> Tally:
    """Accuracy/ECE of the selected predictions and F_correct (clean head right in-distribution, unclean shifted)."""
    routed = routing_tally(sel.chose_clean_B, key=key, shifted=shifted)
    return classification_tally(sel.logits_BK, y_B, key=key) + routed
