import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from robust.attacks import DADConfig, PGDConfig, dad_samples, pgd
from robust.attacks.pgd import random_start

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits_model():
    """A small MLP trained briefly on sklearn digits, as 3x8x8 images in [0, 1]."""
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).div(16).unsqueeze(1).repeat(1, 3, 1, 1)
    y = torch.tensor(digits.target)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    assert (model(x).argmax(1) == y).float().mean() > 0.9
    return model, x[:256], y[:256]


def _ce(model):
    return lambda x, y: F.cross_entropy(model(x), y)


def _dist(a, b, norm):
    d = (a - b).flatten(1)
    return d.norm(dim=1) if norm == "l2" else d.abs().amax(dim=1)


@pytest.mark.parametrize("norm, eps", [("l2", 0.5), ("linf", 0.05)])
def test_pgd_stays_in_ball_and_range_and_raises_loss(digits_model, norm, eps):
    model, x, y = digits_model
    cfg = PGDConfig(norm=norm, eps=eps, alpha=eps / 2, steps=5, random_start_prob=1.0, random_start_scale=eps)
    x_adv = pgd(_ce(model), x, y, cfg, generator=torch.Generator().manual_seed(0))
    dist = _dist(x_adv, x, norm)
    assert dist.max() <= eps + 1e-5 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert dist.max() > 0.9 * eps  # the budget is used, so the projection was exercised
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > 2 * F.cross_entropy(model(x), y)
    assert not x_adv.requires_grad
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_one_step_equals_hand_computation(digits_model, norm):
    model, x, y = digits_model
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    alpha = 0.3 if norm == "l2" else 0.02
    if norm == "l2":
        step = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    else:
        step = g.sign()
    expected = (x.detach() + alpha * step).clamp(0, 1)
    cfg = PGDConfig(norm=norm, eps=100.0, alpha=alpha, steps=1, random_start_prob=0.0)
    torch.testing.assert_close(pgd(_ce(model), x.detach(), y, cfg), expected)
    assert all(p.grad is None for p in model.parameters())


def test_pgd_runs_under_no_grad_and_projects_around_center(digits_model):
    model, x, y = digits_model
    center = (x + 0.1).clamp(0, 1)
    cfg = PGDConfig(norm="l2", eps=0.2, alpha=1.0, steps=2, random_start_prob=0.0)
    with torch.no_grad():
        x_adv = pgd(_ce(model), x, y, cfg, center=center)
    assert _dist(x_adv, center, "l2").max() <= 0.2 + 1e-5
    assert _dist(x_adv, x, "l2").min() > 0.2  # far from x: the ball is around center


def test_random_start_probability_and_radius():
    x = torch.full((2000, 3, 8, 8), 0.5)
    cfg = PGDConfig(norm="l2", random_start_prob=0.3, random_start_scale=0.1)
    x0 = random_start(x, cfg, generator=torch.Generator().manual_seed(1))
    moved = _dist(x0, x, "l2")
    chosen = moved > 0
    assert 0.26 < chosen.float().mean() < 0.34
    torch.testing.assert_close(moved[chosen], torch.full_like(moved[chosen], 0.1))
    x0_inf = random_start(x, PGDConfig(norm="linf", eps=0.03, random_start_prob=1.0))
    dist_inf = _dist(x0_inf, x, "linf")
    assert dist_inf.max() <= 0.03 and dist_inf.min() > 0.02


@pytest.mark.parametrize("bad", [dict(norm="l3"), dict(steps=0), dict(eps=-1.0), dict(random_start_prob=1.5)])
def test_bad_config_raises(digits_model, bad):
    model, x, y = digits_model
    with pytest.raises(ValueError):
        pgd(_ce(model), x, y, PGDConfig(**bad))


def _quantize4(x):
    """A deterministic stand-in for the VQGAN: 4 grey levels."""
    return torch.round(x * 3) / 3


def _discretizer(seen):
    """_quantize4 that records its inputs and checks that DAD calls it without autograd."""

    def discretize(images):
        assert not torch.is_grad_enabled()
        seen.append(images.clone())
        return _quantize4(images)

    return discretize


def test_dad_output_is_discrete_and_pre_point_in_ball(digits_model):
    model, x, y = digits_model
    seen = []
    cfg = DADConfig(eps=0.5, alpha=2.0)  # a step far past the ball: the projection must act
    x_dad = dad_samples(model, _discretizer(seen), x, y, cfg, generator=torch.Generator().manual_seed(0))
    assert len(seen) == 2  # Q(x), then Q(x1)
    torch.testing.assert_close(_quantize4(x_dad), x_dad)
    assert x_dad.min() >= 0 and x_dad.max() <= 1
    x_q, x1 = _quantize4(x), seen[1]
    dist = _dist(x1, x_q, "l2")
    assert dist.max() <= 0.5 + 1e-5 and dist.min() > 0.1
    assert (x_dad != x_q).any()
    assert all(p.grad is None for p in model.parameters())


def test_dad_without_budget_is_double_discretization(digits_model):
    model, x, y = digits_model
    cfg = DADConfig(eps=0.0, random_start_prob=0.0)
    torch.testing.assert_close(dad_samples(model, _discretizer([]), x, y, cfg), _quantize4(_quantize4(x)))


def test_dad_attacks_the_given_model_with_pgd(digits_model):
    """With Q = identity, DAD is PGD on CE(model) from x with the same random start."""
    model, x, y = digits_model
    cfg = DADConfig()
    x_dad = dad_samples(model, lambda t: t, x, y, cfg, generator=torch.Generator().manual_seed(3))
    x_pgd = pgd(_ce(model), x, y, cfg, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x_dad, x_pgd)
    assert _dist(x_dad, x, "l2").min() > 0.05
    other_start = dad_samples(model, lambda t: t, x, y, cfg, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(other_start, x_dad)  # the random start is drawn from the generator
