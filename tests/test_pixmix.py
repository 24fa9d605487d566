import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from robust.augment import augment_ops
from robust.data.shards import make_sample, write_shards
from robust.fractals import FractalConfig, render_fractals, render_ifs, sample_ifs
from robust.pixmix import (
    MixingSetConfig,
    PixMixConfig,
    PixMixPlan,
    apply_pixmix,
    load_mixing_set,
    mix_add,
    mix_multiply,
    mixing_weights,
    pixmix,
    sample_mixing,
    sample_pixmix_plan,
)


torch.set_num_threads(1)  # a shared 2-core machine: more OpenMP threads only spin

def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def images_and_fractals():
    """24 structured uint8 images (colour ramps and a bright square) and 24 fractals, 32 px."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 32, dtype=np.float32)
    images = []
    for _ in range(24):
        c = rng.uniform(40, 220, 3)
        image = np.stack([c[0] * ramp[None, :].repeat(32, 0), c[1] * ramp[:, None].repeat(32, 1),
                          np.full((32, 32), c[2])], axis=0)
        r, col = rng.integers(2, 22, 2)
        image[:, r:r + 8, col:col + 8] = 250
        images.append(image)
    x = torch.from_numpy(np.stack(images).round().astype(np.uint8))
    return x, render_fractals(24, 32, generator=_gen(0))


def _plan(batch, k, *, rounds, multiply, a, b):
    """A hand plan: no augmentation anywhere, the mixing picture mixed in every round."""
    full = lambda v, dtype=torch.float32: torch.full((batch, k), v, dtype=dtype)  # noqa: E731
    return PixMixPlan(
        start_augmented=torch.zeros(batch, dtype=torch.bool),
        rounds=torch.full((batch,), rounds),
        with_augmented=full(False, torch.bool),
        multiply=full(multiply, torch.bool),
        a=full(a),
        b=full(b),
        op_index=torch.zeros(batch, k + 1, dtype=torch.long),
        op_seed=torch.zeros(batch, k + 1, dtype=torch.long),
    )


def test_mixing_ops_match_hand_values():
    m, y = torch.tensor(0.75), torch.tensor(0.25)
    a, b = torch.tensor(0.5), torch.tensor(0.3)
    # add in [-1, 1]: (0.5 * 0.5 + 0.3 * (-0.5) + 1) / 2
    assert mix_add(m, y, a, b).item() == pytest.approx(0.55)
    # multiply in [0, 2]: 1.5^0.5 * 0.5^0.3 / 2
    assert mix_multiply(m, y, a, b).item() == pytest.approx(math.sqrt(1.5) * 0.5**0.3 / 2, rel=1e-6)
    # b < 0 on a black mixing pixel: finite (floored at 1e-37), then clipped by pixmix
    assert torch.isfinite(mix_multiply(m, torch.tensor(0.0), a, torch.tensor(-0.1)))


@pytest.mark.parametrize("multiply", [False, True])
def test_one_hand_checked_round_through_apply_pixmix(images_and_fractals, multiply):
    x, mixing = images_and_fractals
    xf, mf = x.float() / 255, mixing.float() / 255
    plan = _plan(len(x), 2, rounds=1, multiply=multiply, a=0.7, b=-0.2 if multiply else 0.4)
    out = apply_pixmix(xf, mf, plan, augment_ops(3, all_ops=False))
    if multiply:
        hand = ((2 * xf) ** 0.7 * (2 * mf).clamp_min(1e-37) ** -0.2 / 2).clamp(0, 1)
    else:
        hand = ((0.7 * (2 * xf - 1) + 0.4 * (2 * mf - 1) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(out, hand, rtol=1e-6, atol=1e-6)
    # a second round (rounds=2) applies the same step to the result
    plan2 = _plan(len(x), 2, rounds=2, multiply=multiply, a=0.7, b=-0.2 if multiply else 0.4)
    twice = apply_pixmix(xf, mf, plan2, augment_ops(3, all_ops=False))
    torch.testing.assert_close(twice, apply_pixmix(hand, mf, plan, augment_ops(3, all_ops=False)))


def test_zero_rounds_without_augmented_start_is_identity(images_and_fractals):
    x, mixing = images_and_fractals
    plan = _plan(len(x), 4, rounds=0, multiply=False, a=0.5, b=0.5)
    ops = augment_ops(3, all_ops=False)
    assert torch.equal(apply_pixmix(x, mixing, plan, ops), x)  # uint8 in, the same uint8 out
    xf = x.float() / 255
    assert torch.equal(apply_pixmix(xf, mixing, plan, ops), xf)
    # k = 0: no mixing round at all; only the images that start from an augmented copy change
    cfg = PixMixConfig(k=0)
    out = pixmix(x, mixing, cfg, generator=_gen(5))
    start = sample_pixmix_plan(len(x), cfg, generator=_gen(5)).start_augmented
    assert 0 < start.sum() < len(x)
    assert torch.equal(out[~start], x[~start])


def test_pixmix_range_dtype_determinism_and_rng_isolation(images_and_fractals):
    x, mixing = images_and_fractals
    cfg = PixMixConfig()
    python_state = random.getstate()
    out = pixmix(x, mixing, cfg, generator=_gen(1))
    assert random.getstate() == python_state  # timm's ops ran on a seeded, then restored, Python RNG
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, pixmix(x, mixing, cfg, generator=_gen(1)))
    assert not torch.equal(out, pixmix(x, mixing, cfg, generator=_gen(2)))
    changed = (out.float() - x.float()).abs().flatten(1).mean(1) > 1
    assert changed.float().mean() > 0.5  # most images are mixed or augmented

    outf = pixmix(x.float() / 255, mixing.float() / 255, cfg, generator=_gen(1))
    assert outf.dtype == torch.float32 and outf.min() >= 0 and outf.max() <= 1
    # the same plan on float input is the uint8 result before rounding
    assert (outf * 255 - out.float()).abs().max() <= 0.5 + 1e-3

    with pytest.raises(ValueError, match="mixing picture"):
        pixmix(x, mixing[:, :, :16], cfg, generator=_gen(1))
    with pytest.raises(ValueError, match="k >= 0"):
        pixmix(x, mixing, PixMixConfig(k=-1), generator=_gen(1))


def test_mixing_weights_follow_the_official_distribution():
    a, b = mixing_weights((200_000,), 4.0, generator=_gen(0))
    first = a < 1  # branch 1: a ~ Beta(4, 1) in (0, 1); branch 2: a = 1 + Beta(1, 4) in [1, 2)
    assert first.float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert (b[first] >= 0).all() and (b[~first] <= 0).all()
    # means: Beta(4, 1) 4/5, Beta(1, 4) 1/5
    assert a[first].mean().item() == pytest.approx(0.8, abs=0.005)
    assert b[first].mean().item() == pytest.approx(0.2, abs=0.005)
    assert a[~first].mean().item() == pytest.approx(1.2, abs=0.005)
    assert b[~first].mean().item() == pytest.approx(-0.2, abs=0.005)


def test_fractals_are_seeded_non_constant_and_any_size():
    a = render_fractals(6, (24, 40), generator=_gen(3))
    assert a.shape == (6, 3, 24, 40) and a.dtype == torch.uint8
    assert torch.equal(a, render_fractals(6, (24, 40), generator=_gen(3)))
    assert not torch.equal(a, render_fractals(6, (24, 40), generator=_gen(4)))
    lit = (a.amax(1) > 0).float().mean((1, 2))
    assert (lit >= FractalConfig().min_coverage).all() and (lit < 0.9).all()
    assert (a.float().flatten(1).std(1) > 5).all()
    assert render_fractals(2, 7, generator=_gen(0)).shape == (2, 3, 7, 7)
    with pytest.raises(ValueError):
        render_fractals(0, 32, generator=_gen(0))


def test_sampled_ifs_are_contractive_with_area_weighted_probabilities():
    cfg = FractalConfig()
    a, b, p = sample_ifs(500, cfg, generator=_gen(0))
    assert a.shape == (500, 4, 2, 2) and b.shape == (500, 4, 2) and p.shape == (500, 4)
    active = p > 0
    assert (active.sum(1) >= cfg.min_maps).all() and (active.sum(1) <= cfg.max_maps).all()
    assert (torch.linalg.svdvals(a)[active] < 1).all()  # contractive: the attractor exists
    torch.testing.assert_close(p.sum(1), torch.ones(500))
    det = torch.linalg.det(a).abs() * active
    torch.testing.assert_close(p, det / det.sum(1, keepdim=True))


def test_chaos_game_draws_the_sierpinski_triangle():
    # w_i(x) = x / 2 + v_i / 2 for the vertices (0, 0), (1, 0), (1/2, 1): the attractor's bounding
    # box is the unit square, fitted with a 5% margin: pixel = (x - 1/2) * 0.9 * 64 + 32
    a = (torch.eye(2) / 2).expand(1, 3, 2, 2)
    b = torch.tensor([[[0.0, 0.0], [0.5, 0.0], [0.25, 0.5]]])
    image = render_ifs(a, b, torch.full((1, 3), 1 / 3), 64, 64, points=64 * 64 * 8, generator=_gen(0))
    lit = image[0].amax(0) > 0

    def pixel(x, y):
        return int((y - 0.5) * 57.6 + 32), int((x - 0.5) * 57.6 + 32)

    # the central hole (the triangle of the midpoints) is dark around its centroid (1/2, 1/3)
    row, col = pixel(0.5, 1 / 3)
    assert not lit[row - 2 : row + 3, col - 3 : col + 4].any()
    for vertex in ((0.02, 0.01), (0.98, 0.01), (0.5, 0.98)):
        row, col = pixel(*vertex)
        assert lit[row - 1 : row + 2, col - 1 : col + 2].any(), vertex
    assert not lit[pixel(0.05, 0.9)]  # outside the triangle


def test_mixing_set_from_fractals_folder_and_shards(tmp_path):
    fractals = load_mixing_set(MixingSetConfig(num_images=5, seed=1), size=(16, 16))
    assert fractals.shape == (5, 3, 16, 16) and fractals.dtype == torch.uint8
    assert torch.equal(fractals, render_fractals(5, (16, 16), generator=_gen(1)))

    colours = [20, 60, 100, 140]
    images = [np.full((20, 30, 3), c, dtype=np.uint8) for c in colours]
    for i, image in enumerate(images):
        (tmp_path / "folder" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "folder" / f"c{i % 2}" / f"{i}.png")
    folder = load_mixing_set(MixingSetConfig(source=str(tmp_path / "folder"), num_images=10), size=(16, 16))
    assert folder.shape == (4, 3, 16, 16)
    # every file once, in sorted path order: c0/0, c0/2, c1/1, c1/3
    assert [im.unique().tolist() for im in folder] == [[20], [100], [60], [140]]
    two = load_mixing_set(MixingSetConfig(source=str(tmp_path / "folder"), num_images=2, seed=3), size=(8, 12))
    assert two.shape == (2, 3, 8, 12) and len({im.unique().item() for im in two}) == 2

    def png(im):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        return buf.getvalue()

    write_shards([make_sample(f"k{i}", png(im), 0) for i, im in enumerate(images)], tmp_path / "shards")
    shards = load_mixing_set(MixingSetConfig(source=str(tmp_path / "shards"), num_images=3), size=(16, 16))
    assert shards.shape == (3, 3, 16, 16)
    assert [im.unique().tolist() for im in shards] == [[20], [60], [100]]  # the first 3 of the shards

    drawn = sample_mixing(folder, 9, generator=_gen(0))
    assert drawn.shape == (9, 3, 16, 16) and all(any(torch.equal(d, f) for f in folder) for d in drawn)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_mixing_set(MixingSetConfig(source=str(tmp_path / "empty")), size=(16, 16))
