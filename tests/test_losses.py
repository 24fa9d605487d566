import math

import pytest
import torch
import torch.nn.functional as F

from robust.config import load_config
from robust.losses import ObjectiveConfig, kd_loss, objective, soft_ce


def _kl_by_hand(teacher_BK, student_BK, tau):
    """KL(softmax(t/tau) || softmax(s/tau)), summed over classes, averaged over the batch."""
    p_t = torch.softmax(teacher_BK.double() / tau, dim=1)
    return (p_t * (p_t.log() - torch.log_softmax(student_BK.double() / tau, dim=1))).sum(1).mean()


def _ce_by_hand(logits_BK, y_B):
    return -torch.log_softmax(logits_BK.double(), dim=1)[torch.arange(len(y_B)), y_B].mean()


@pytest.fixture
def batch():
    torch.manual_seed(0)
    b, k = 6, 5
    return dict(s=torch.randn(b, k) * 3, t=torch.randn(b, k) * 3, s_adv=torch.randn(b, k) * 3,
                t_adv=torch.randn(b, k) * 3, y=torch.randint(0, k, (b,)))


def test_kd_loss_two_class_hand_number():
    # p_t = (3/4, 1/4), p_s = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812...
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    assert kd_loss(s, t, 1.0).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-6)
    assert kd_loss(s, t, 1.0).item() == pytest.approx(0.130812, abs=1e-6)
    # tau = 2: p_t = (sqrt3, 1) / (1 + sqrt3), times tau^2 = 4
    a = math.sqrt(3) / (1 + math.sqrt(3))
    expected = 4 * (a * math.log(a / 0.5) + (1 - a) * math.log((1 - a) / 0.5))
    assert kd_loss(s, t, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_matches_formula_and_accepts_fp16_teacher(batch):
    s, t = batch["s"], batch["t"]
    expected = 16 * _kl_by_hand(t, s, 4.0)
    assert kd_loss(s, t, 4.0).double().item() == pytest.approx(expected.item(), rel=1e-5)
    half = kd_loss(s, t.half(), 4.0)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(16 * _kl_by_hand(t.half().float(), s, 4.0).item(), rel=1e-5)
    assert kd_loss(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="differ"):
        kd_loss(s, t[:, :3], 4.0)


def test_soft_ce_hard_and_soft_targets(batch):
    s, y = batch["s"], batch["y"]
    one_hot = F.one_hot(y, 5).half()
    assert soft_ce(s, one_hot).item() == pytest.approx(_ce_by_hand(s, y).item(), rel=1e-5)
    assert soft_ce(s, y).item() == pytest.approx(_ce_by_hand(s, y).item(), rel=1e-5)
    smoothed_BK = 0.9 * F.one_hot(y, 5).double() + 0.1 / 5  # timm's mixup_target(lam=1, smoothing=0.1)
    by_hand = 0.9 * _ce_by_hand(s, y) - 0.1 * torch.log_softmax(s.double(), 1).mean(1).mean()
    assert soft_ce(s, smoothed_BK).item() == pytest.approx(by_hand.item(), rel=1e-5)


def _call(kind, b):
    return objective(kind, ObjectiveConfig(), student_logits=b["s"], y=b["y"],
                     teacher_logits=b["t"], student_adv_logits=b["s_adv"], teacher_adv_logits=b["t_adv"])


def test_dad_online_is_ce_plus_two_half_tau_squared_kls(batch):
    b, tau = batch, 4.0
    ce = _ce_by_hand(b["s"], b["y"])
    kl1, kl2 = _kl_by_hand(b["t"], b["s"], tau), _kl_by_hand(b["t_adv"], b["s_adv"], tau)
    loss, terms = _call("dad_online", b)
    assert loss.item() == pytest.approx((ce + tau**2 / 2 * kl1 + tau**2 / 2 * kl2).item(), rel=1e-5)
    assert terms["kd_clean"].item() == pytest.approx(tau**2 * kl1.item(), rel=1e-5)
    assert terms["kd_adv"].item() == pytest.approx(tau**2 * kl2.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert all(not v.requires_grad for v in terms.values())
    # student equals teacher on both batches: only the CE remains
    same = dict(b, s=b["t"], s_adv=b["t_adv"])
    assert _call("dad_online", same)[0].item() == pytest.approx(_ce_by_hand(b["t"], b["y"]).item(), rel=1e-5)
    # soft one-hot labels give the same loss as hard labels
    soft = dict(b, y=F.one_hot(b["y"], 5).float())
    assert _call("dad_online", soft)[0].item() == pytest.approx(loss.item(), rel=1e-6)


def test_dad_offline_weights_on_the_concatenated_batch(batch):
    b = batch
    s_all, t_all = torch.cat([b["s"], b["s_adv"]]), torch.cat([b["t"], b["t_adv"]])
    expected = 0.75 * _ce_by_hand(s_all, torch.cat([b["y"], b["y"]])) + 4 * _kl_by_hand(t_all, s_all, 4.0)
    loss, terms = _call("dad_offline", b)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(terms) == {"loss", "ce", "kd"}


def test_ce_kd_and_dat(batch):
    b = batch
    ce = _ce_by_hand(b["s"], b["y"])
    assert _call("ce", b)[0].item() == pytest.approx(ce.item(), rel=1e-5)
    kd = ce + 8 * _kl_by_hand(b["t"], b["s"], 4.0)
    assert _call("kd", b)[0].item() == pytest.approx(kd.item(), rel=1e-5)
    dat = ce + _ce_by_hand(b["s_adv"], b["y"])
    assert _call("dat", b)[0].item() == pytest.approx(dat.item(), rel=1e-5)


def test_objective_errors_and_config_loading(batch):
    with pytest.raises(ValueError, match="unknown"):
        _call("dadd", batch)
    with pytest.raises(ValueError, match="teacher_adv_logits"):
        objective("dad_online", ObjectiveConfig(), student_logits=batch["s"], y=batch["y"],
                  teacher_logits=batch["t"], student_adv_logits=batch["s_adv"])
    with pytest.raises(ValueError, match="student_adv_logits"):
        objective("dat", ObjectiveConfig(), student_logits=batch["s"], y=batch["y"])
    cfg = load_config(ObjectiveConfig, overrides=["offline_ce_weight=0.5"])
    assert cfg == ObjectiveConfig(offline_ce_weight=0.5)
    with pytest.raises(ValueError, match="kind"):  # the method chooses the kind, not the config
        load_config(ObjectiveConfig, overrides=["kind=dad_offline"])


def test_gradient_reaches_the_student_only(batch):
    s = batch["s"].clone().requires_grad_(True)
    s_adv = batch["s_adv"].clone().requires_grad_(True)
    loss, _ = objective("dad_online", ObjectiveConfig(), student_logits=s, y=batch["y"], teacher_logits=batch["t"].half(),
                        student_adv_logits=s_adv, teacher_adv_logits=batch["t_adv"].half())
    loss.backward()
    assert s.grad.abs().sum() > 0 and s_adv.grad.abs().sum() > 0
