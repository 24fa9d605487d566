"""robust.rpt.losses: eq. 3-5 and the one-head variants against per-sample hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from robust.models.timm_models import TimmConfig
from robust.rpt.baselines import method_loss_config
from robust.rpt.losses import RptLossConfig, rpt_loss
from robust.rpt.partial import PartialConfig, build_partial

torch.set_num_threads(1)

B, K = 6, 10


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    student = build_partial(PartialConfig(timm=TimmConfig(name="test_vit", num_classes=K, img_size=32),
                                          tune_from_block=5))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    x = torch.rand(B, 3, 32, 32, generator=g)
    y = torch.randint(0, K, (B,), generator=g)
    is_aug = torch.tensor([False, True, False, True, True, False])
    t_init, t_rob = 3 * torch.randn(B, K, generator=g), 3 * torch.randn(B, K, generator=g)
    return student, student(x), y, is_aug, t_init, t_rob


def _log_softmax(v: list[float]) -> list[float]:
    m = max(v)
    log_z = m + math.log(sum(math.exp(a - m) for a in v))
    return [a - log_z for a in v]


def _ce(s, k: int) -> float:
    return -_log_softmax(s.tolist())[k]


def _kd(s, t, tau: float) -> float:  # tau^2 * sum_k p_t,k (log p_t,k - log p_s,k), Hinton's scaled KL
    log_s, log_t = _log_softmax([a / tau for a in s.tolist()]), _log_softmax([a / tau for a in t.tolist()])
    return tau**2 * sum(math.exp(lt) * (lt - ls) for ls, lt in zip(log_s, log_t))


def _by_hand(logits, y, is_aug, t_init, t_rob, *, tau, kd_weight, clean_teacher="initial"):
    sums = {f"{term}_{h}": 0.0 for term in ("ce", "kd", "n") for h in logits}
    for i in range(B):
        aug = bool(is_aug[i])
        teacher = t_rob[i] if aug or clean_teacher == "robust" else t_init[i]
        for head in logits:
            if head == ("clean" if aug else "unclean"):
                continue  # the clean head learns from clean samples only, the unclean head from augmented ones
            s = logits[head][i].detach()
            sums[f"ce_{head}"] += _ce(s, int(y[i]))
            sums[f"kd_{head}"] += _kd(s, teacher, tau)
            sums[f"n_{head}"] += 1
    loss = sum(sums[f"ce_{h}"] + kd_weight * sums[f"kd_{h}"] for h in logits) / B
    return loss, sums


@pytest.mark.parametrize(("tau", "kd_weight"), [(4.0, 1.0), (2.0, 0.5), (1.0, 0.0)])
def test_three_head_loss_terms_match_eq_3_to_5_by_hand(batch, tau, kd_weight):
    student, logits, y, is_aug, t_init, t_rob = batch
    cfg = RptLossConfig(tau=tau, kd_weight=kd_weight)
    loss, terms = rpt_loss(logits, y, is_aug_B=is_aug, t_init_logits=t_init, t_robust_logits=t_rob, cfg=cfg)
    want_loss, want = _by_hand(logits, y, is_aug, t_init, t_rob, tau=tau, kd_weight=kd_weight)
    assert loss.item() == pytest.approx(want_loss, rel=1e-5)
    assert terms["n"].item() == B and terms["loss"].item() == pytest.approx(want_loss * B, rel=1e-5)
    assert (terms["n_clean"].item(), terms["n_unclean"].item(), terms["n_combined"].item()) == (3, 3, 6)
    for name, value in want.items():
        if name.startswith("kd") and kd_weight == 0:
            assert terms[name].item() == 0.0  # no KD term at all without KD
        else:
            assert terms[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_each_head_learns_only_from_its_own_samples(batch):
    student, _, y, _, t_init, t_rob = batch
    x = torch.rand(B, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    all_aug = torch.ones(B, dtype=torch.bool)
    student.zero_grad()
    loss, terms = rpt_loss(student(x), y, is_aug_B=all_aug, t_init_logits=t_init, t_robust_logits=t_rob,
                           cfg=RptLossConfig())  # fmt: skip
    loss.backward()
    grad = {h: student.tuned.heads[h].shell.head.weight.grad for h in ("clean", "unclean", "combined")}
    assert terms["n_clean"].item() == 0 and terms["ce_clean"].item() == 0
    assert grad["clean"] is not None and torch.count_nonzero(grad["clean"]) == 0  # a zero gradient, not a missing one
    assert grad["unclean"].abs().sum() > 0 and grad["combined"].abs().sum() > 0


@pytest.mark.parametrize("method", ["single_teacher", "only_kd", "apt"])
def test_one_head_variants_match_by_hand(batch, method):
    _, logits, y, is_aug, t_init, t_rob = batch
    cfg = method_loss_config(method, RptLossConfig(tau=3.0))
    one = {"combined": logits["combined"]}
    loss, terms = rpt_loss(one, y, is_aug_B=is_aug, t_init_logits=t_init, t_robust_logits=t_rob, cfg=cfg)
    want_loss, want = _by_hand(one, y, is_aug, t_init, t_rob, tau=3.0, kd_weight=cfg.kd_weight,
                               clean_teacher=cfg.clean_teacher)  # fmt: skip
    assert loss.item() == pytest.approx(want_loss, rel=1e-5)
    assert terms["kd_combined"].item() == pytest.approx(want["kd_combined"] if cfg.kd_weight else 0.0, rel=1e-5)
    if method == "apt":  # CE only: plain cross-entropy over clean and augmented samples
        assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits["combined"], y).item(), rel=1e-6)
    if method == "only_kd":  # the robust teacher for every sample: the initial model is never needed
        rpt_loss(one, y, is_aug_B=is_aug, t_init_logits=None, t_robust_logits=t_rob, cfg=cfg)


def test_soft_targets_are_accepted(batch):
    _, logits, y, is_aug, t_init, t_rob = batch
    soft = torch.nn.functional.one_hot(y, K).float()
    kw = {"is_aug_B": is_aug, "t_init_logits": t_init, "t_robust_logits": t_rob, "cfg": RptLossConfig()}
    assert torch.allclose(rpt_loss(logits, soft, **kw)[0], rpt_loss(logits, y, **kw)[0], rtol=1e-6)


def test_bad_input_is_a_clear_error(batch):
    _, logits, y, is_aug, t_init, t_rob = batch
    kw = {"is_aug_B": is_aug, "cfg": RptLossConfig()}
    with pytest.raises(ValueError, match="needs t_robust_logits"):
        rpt_loss(logits, y, t_init_logits=t_init, t_robust_logits=None, **kw)
    with pytest.raises(ValueError, match="needs t_init_logits"):
        rpt_loss(logits, y, t_init_logits=None, t_robust_logits=t_rob, **kw)
    with pytest.raises(ValueError, match="same classes"):  # a teacher with other classes than the student
        rpt_loss(logits, y, t_init_logits=t_init[:, :5], t_robust_logits=t_rob, **kw)
    with pytest.raises(ValueError, match="clean, unclean or combined"):
        rpt_loss({"robust": logits["clean"]}, y, t_init_logits=t_init, t_robust_logits=t_rob, **kw)
    with pytest.raises(ValueError, match="clean_teacher='student' is unknown"):
        rpt_loss(logits, y, is_aug_B=is_aug, t_init_logits=t_init, t_robust_logits=t_rob,
                 cfg=RptLossConfig(clean_teacher="student"))  # fmt: skip
    with pytest.raises(ValueError, match="tau > 0"):
        rpt_loss(logits, y, is_aug_B=is_aug, t_init_logits=t_init, t_robust_logits=t_rob, cfg=RptLossConfig(tau=0))
