import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import robust.deepaugment
from robust.data.digits import digits_arrays
from robust.data.shard_reader import load_shards
from robust.deepaugment import (
    DeepAugConfig,
    autoencoder_for,
    build_autoencoder,
    deepaugment,
    deepaugment_dataset,
    latent_mask,
    perturbed_parameters,
    train_autoencoder,
    write_deepaugment_shards,
)

SMALL = DeepAugConfig(width=8, latent_channels=8, train_steps=60, batch_size=32, lr=3e-3)
NO_PERTURBATION = dict(layers=0, weight_noise=0.0, filter_zero=0.0, filter_flip=0.0, latent_noise=0.0,
                       latent_zero=0.0, latent_flip=0.0)


torch.set_num_threads(1)  # a shared 2-core machine: more OpenMP threads only spin

def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def digits():
    x, y, _, _ = digits_arrays()
    return x[:128], y[:128]


@pytest.fixture(scope="module")
def trained(digits):
    """A small autoencoder trained briefly on 128 digits, and its reconstruction error before/after."""
    x = torch.from_numpy(digits[0]).permute(0, 3, 1, 2)
    net = build_autoencoder(SMALL)
    xf = x.float() / 255
    with torch.no_grad():
        before = (net(xf) - xf).abs().mean().item()
    train_autoencoder(net, x, SMALL, progress=False)
    with torch.no_grad():
        after = (net(xf) - xf).abs().mean().item()
    return net, before, after


def _convs(net):
    return [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]


def test_brief_training_learns_to_reconstruct(trained):
    net, before, after = trained
    assert not net.training
    assert after < 0.5 * before, (before, after)


def test_deepaugment_changes_images_in_range_and_is_seeded(digits, trained):
    net = trained[0]
    x = torch.from_numpy(digits[0][:48]).permute(0, 3, 1, 2)
    out = deepaugment(x, net, SMALL, generator=_gen(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, deepaugment(x, net, SMALL, generator=_gen(0)))
    assert not torch.equal(out, deepaugment(x, net, SMALL, generator=_gen(1)))

    xf = x.float() / 255
    outf = deepaugment(xf, net, SMALL, generator=_gen(0))
    assert outf.dtype == torch.float32 and outf.min() >= 0 and outf.max() <= 1
    torch.testing.assert_close(outf.mul(255).round().to(torch.uint8), out, rtol=0, atol=1)
    with torch.no_grad():
        reconstruction = net(xf)
    # per copy of 16 images: away from the input, and away from what the unperturbed network makes
    for chunk in range(3):
        part = slice(16 * chunk, 16 * (chunk + 1))
        assert (outf[part] - xf[part]).abs().mean() > 0.01
        assert (outf[part] - reconstruction[part]).abs().mean() > 0.005


def test_zero_perturbation_is_the_autoencoder_exactly(digits, trained):
    net = trained[0]
    xf = torch.from_numpy(digits[0][:20]).permute(0, 3, 1, 2).float() / 255
    zero = dataclasses.replace(SMALL, **NO_PERTURBATION)
    with torch.no_grad():
        # per copy of images_per_copy=16 images (a conv's float sums may depend on the batch size)
        assert torch.equal(deepaugment(xf, net, zero, generator=_gen(0)), torch.cat([net(xf[:16]), net(xf[16:])]))
    # strength 0 with layers chosen: still the same parameters, bit for bit
    params = perturbed_parameters(net, dataclasses.replace(zero, layers=len(_convs(net))), generator=_gen(0))
    assert all(torch.equal(params[name], p) for name, p in net.named_parameters())


def test_weight_perturbations_hit_the_chosen_number_of_layers(trained):
    net = trained[0]
    names = [name for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    base = dict(net.named_parameters())
    zero_all = dataclasses.replace(SMALL, **NO_PERTURBATION | dict(layers=2, filter_zero=1.0))
    params = perturbed_parameters(net, zero_all, generator=_gen(3))
    zeroed = [n for n in names if not params[f"{n}.weight"].any() and not params[f"{n}.bias"].any()]
    untouched = [n for n in names if torch.equal(params[f"{n}.weight"], base[f"{n}.weight"])]
    assert len(zeroed) == 2 and len(untouched) == len(names) - 2

    flip_all = dataclasses.replace(SMALL, **NO_PERTURBATION | dict(layers=len(names), filter_flip=1.0))
    params = perturbed_parameters(net, flip_all, generator=_gen(3))
    assert all(torch.equal(params[name], -p) for name, p in base.items())

    # noise: w (1 + sigma eps), so (w' / w - 1) / sigma is standard normal on the chosen layer
    noisy = dataclasses.replace(SMALL, **NO_PERTURBATION | dict(layers=1, weight_noise=0.5))
    params = perturbed_parameters(net, noisy, generator=_gen(4))
    changed = [n for n in names if not torch.equal(params[f"{n}.weight"], base[f"{n}.weight"])]
    assert len(changed) == 1
    w = base[f"{changed[0]}.weight"].detach()
    eps = ((params[f"{changed[0]}.weight"] / w - 1) / 0.5)[w != 0]
    assert eps.mean().abs() < 0.1 and eps.std().item() == pytest.approx(1.0, abs=0.1)


def test_latent_perturbations(digits, trained):
    net = trained[0]
    xf = torch.from_numpy(digits[0][:8]).permute(0, 3, 1, 2).float() / 255
    all_zero = dataclasses.replace(SMALL, **NO_PERTURBATION | dict(latent_zero=1.0))
    mask = latent_mask(8, 32, 32, net, all_zero, generator=_gen(0))
    assert mask.shape == (8, SMALL.latent_channels, 8, 8) and not mask.any()
    out = deepaugment(xf, net, all_zero, generator=_gen(0))
    assert torch.equal(out, out[:1].expand_as(out))  # a zero code: every image decodes to the same picture
    flips = latent_mask(200, 32, 32, net, dataclasses.replace(SMALL, **NO_PERTURBATION | dict(latent_flip=0.3)),
                        generator=_gen(0))
    assert set(flips.unique().tolist()) == {-1.0, 1.0}
    assert (flips[:, 0] < 0).float().mean().item() == pytest.approx(0.3, abs=0.02)
    with pytest.raises(ValueError, match="probabilities"):
        deepaugment(xf, net, dataclasses.replace(SMALL, latent_zero=1.5), generator=_gen(0))
    with pytest.raises(ValueError, match="multiples of 4"):
        deepaugment(xf[..., :30], net, SMALL, generator=_gen(0))


def test_dataset_copy_shards_and_checkpoint(tmp_path, digits, trained, monkeypatch):
    net = trained[0]
    x, y = digits[0][:40], digits[1][:40]
    cfg = dataclasses.replace(SMALL, copies=2)
    monkeypatch.setattr(robust.deepaugment, "_BATCH", 20)  # batches of 16 images: whole copies, then the rest
    x_da, y_da = deepaugment_dataset(x, y, net, cfg, seed=5)
    assert x_da.shape == (80, 32, 32, 3) and x_da.dtype == np.uint8
    np.testing.assert_array_equal(y_da, np.concatenate([y, y]))
    generator = torch.Generator().manual_seed(5)
    x_BCHW = torch.from_numpy(x).permute(0, 3, 1, 2)
    direct = torch.cat([deepaugment(x_BCHW, net, cfg, generator=generator) for _ in range(2)])
    np.testing.assert_array_equal(x_da, direct.permute(0, 2, 3, 1).numpy())
    assert not np.array_equal(x_da[:40], x_da[40:])  # the two copies are different perturbations

    manifest = write_deepaugment_shards(x, y, tmp_path / "da", net, cfg, seed=5, max_per_shard=30, num_classes=10)
    assert manifest.total == 80 and len(manifest.shards) == 3
    loaded = load_shards(tmp_path / "da")
    assert loaded.keys[:2] == ["da0-000000000", "da0-000000001"] and loaded.keys[40] == "da1-000000000"
    torch.testing.assert_close(loaded.x_BCHW, torch.from_numpy(x_da).permute(0, 3, 1, 2).float() / 255)
    assert loaded.y_B.tolist() == y_da.tolist()

    save_file(net.state_dict(), tmp_path / "cae.safetensors")
    from_checkpoint = dataclasses.replace(SMALL, checkpoint=str(tmp_path / "cae.safetensors"), seed=9)
    loaded_net = autoencoder_for(torch.zeros(1, 3, 32, 32), from_checkpoint, progress=False)  # loads, no training
    assert all(torch.equal(a, b) for a, b in zip(loaded_net.state_dict().values(), net.state_dict().values()))
    with pytest.raises(ValueError, match="does not exist"):
        build_autoencoder(dataclasses.replace(SMALL, checkpoint=str(tmp_path / "missing.safetensors")))
