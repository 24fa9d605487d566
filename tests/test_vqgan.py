"""robust.models.vqgan (discretizer Q, taming checkpoints) and vqgan_train (the local trainer)."""

from __future__ import annotations

import math
import sys
import types
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from robust.models.vqgan import VQGAN, VQGANConfig, build_vqgan, discretize
from robust.models.vqgan_train import VQGANTrainConfig, psnr, restart_dead_codes, train_step, train_vqgan

torch.set_num_threads(1)

TINY = VQGANConfig(
    resolution=16, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8],
    z_channels=8, embed_dim=8, n_embed=16, chunk_size=0,
)  # fmt: skip


def _frozen_tiny(seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    return build_vqgan(TINY)


def test_tiny_vqgan_shapes():
    vqgan = _frozen_tiny()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    quant, vq_loss, codes = vqgan.encode(x)
    assert quant.shape == (3, 8, 8, 8) and codes.shape == (3 * 8 * 8,) and vq_loss.shape == ()
    assert int(codes.max()) < TINY.n_embed
    # the quantized latents are codebook rows
    torch.testing.assert_close(quant.permute(0, 2, 3, 1).reshape(-1, 8), vqgan.quantize.embedding.weight[codes])
    assert vqgan.decode(quant).shape == x.shape


def test_discretize_is_the_dad_formula_without_gradient():
    vqgan = _frozen_tiny()
    x = torch.rand(5, 3, 16, 16, requires_grad=True)
    q = discretize(vqgan, x)
    with torch.no_grad():
        expected = (vqgan.decode(vqgan.encode(2 * x - 1)[0]).clamp(-1, 1) + 1) / 2
    assert torch.equal(q, expected)
    assert q.shape == x.shape and not q.requires_grad and q.grad_fn is None
    assert q.min() >= 0 and q.max() <= 1
    vqgan.cfg = replace(TINY, chunk_size=2)  # 5 images in chunks of 2, 2, 1
    torch.testing.assert_close(discretize(vqgan, x), q, atol=1e-5, rtol=0)


def _taming_ckpt(vqgan: VQGAN, **extra: object) -> dict:
    """The layout of a taming/Lightning .ckpt: weights under "state_dict", loss.* entries included."""
    state_dict = dict(vqgan.state_dict())
    state_dict["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    state_dict["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    return {"state_dict": state_dict, "epoch": 7, "global_step": 1234, **extra}


def test_taming_checkpoint_loads_and_reproduces_outputs(tmp_path):
    source = _frozen_tiny(seed=0)
    path = tmp_path / "last.ckpt"
    torch.save(_taming_ckpt(source), path)
    torch.manual_seed(1)
    loaded = build_vqgan(replace(TINY, checkpoint=str(path)))
    x = torch.rand(4, 3, 16, 16)
    assert torch.equal(discretize(loaded, x), discretize(source, x))
    assert not torch.equal(discretize(_frozen_tiny(seed=1), x), discretize(source, x))  # the load mattered


RAN: list[str] = []


def _record(tag: str) -> str:
    RAN.append(tag)
    return tag


class _RunsOnLoad:
    """Unpickling this calls _record: what a malicious or Lightning-specific pickle would do."""

    def __reduce__(self):
        return (_record, ("executed",))


def test_lightning_style_checkpoint_loads_without_importing_or_running_anything(tmp_path):
    # a callback class from a module that will not exist at load time (like Lightning on this machine)
    module = types.ModuleType("fake_lightning_callbacks")
    callback_cls = type("ModelCheckpoint", (), {"__module__": module.__name__})
    module.ModelCheckpoint = callback_cls
    sys.modules[module.__name__] = module
    try:
        ckpt = _taming_ckpt(
            _frozen_tiny(seed=0),
            callbacks={callback_cls: {"best_model_score": torch.tensor(0.1)}},
            callback=callback_cls(),
            hooks=_RunsOnLoad(),
        )
        path = tmp_path / "lightning.ckpt"
        torch.save(ckpt, path)
    finally:
        del sys.modules[module.__name__]
    with pytest.raises(Exception):  # noqa: B017 - the plain safe loader refuses it
        torch.load(path, weights_only=True)
    loaded = build_vqgan(replace(TINY, checkpoint=str(path)))
    assert RAN == [] and module.__name__ not in sys.modules
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(discretize(loaded, x), discretize(_frozen_tiny(seed=0), x))


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save(_taming_ckpt(_frozen_tiny()), path)
    with pytest.raises(ValueError, match="does not fit"):
        build_vqgan(replace(TINY, n_embed=32, checkpoint=str(path)))
    with pytest.raises(ValueError, match=r"missing keys \['encoder.down.0.attn.0"):
        build_vqgan(replace(TINY, attn_resolutions=[8, 16], checkpoint=str(path)))
    with pytest.raises(ValueError, match="does not exist"):
        build_vqgan(replace(TINY, checkpoint=str(tmp_path / "missing.ckpt")))


@pytest.mark.cuda  # "auto" is bf16 and channels_last applies on CUDA only
def test_discretize_on_cuda_defaults_to_bf16_channels_last_close_to_fp32():
    vqgan = _frozen_tiny()
    x = torch.rand(8, 3, 16, 16)
    reference = discretize(vqgan, x)
    cuda_vqgan = build_vqgan(TINY, device="cuda")
    cuda_vqgan.load_state_dict(vqgan.state_dict())
    assert cuda_vqgan.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    dtypes = []
    handle = cuda_vqgan.encoder.conv_out.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    fast = discretize(cuda_vqgan, x.cuda())
    handle.remove()
    assert dtypes == [torch.bfloat16] and fast.dtype == torch.float32 and fast.shape == x.shape
    assert (fast.cpu() - reference).abs().mean() < 0.02


def _structured_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth random grey fields: 4x4 noise upsampled, squashed into [0, 1], repeated to RGB."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 1, 4, 4, generator=g)
    return torch.sigmoid(2 * F.interpolate(low, size=size, mode="bicubic", align_corners=False)).repeat(1, 3, 1, 1)


def test_a_few_training_steps_reduce_the_l1_loss():
    cfg = VQGANTrainConfig(vqgan=TINY, batch_size=8, lr=2e-3)
    vqgan, stats = train_vqgan(_structured_images(64), cfg, steps=20, progress=False)
    assert stats["l1_last"] < 0.65 * stats["l1_first"], stats  # measured over 3 seeds: ratio 0.46-0.50
    assert stats["psnr_db"] > 14, stats  # measured: 15.6-15.8 dB
    assert not vqgan.training


def test_adversarial_step_updates_generator_and_discriminator():
    from taming.modules.discriminator.model import NLayerDiscriminator

    torch.manual_seed(0)
    cfg = VQGANTrainConfig(vqgan=TINY, adv_weight=0.1, disc_layers=1, disc_ndf=8)
    vqgan, disc = VQGAN(TINY), NLayerDiscriminator(input_nc=3, ndf=8, n_layers=1)
    opt_g, opt_d = torch.optim.Adam(vqgan.parameters(), lr=1e-3), torch.optim.Adam(disc.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in (vqgan.decoder.conv_out.weight, disc.main[0].weight)]
    logs, codes = train_step(vqgan, disc, opt_g, opt_d, _structured_images(4), cfg=cfg)
    assert {"l1", "vq", "g_adv", "d"} <= set(logs) and codes.shape == (4 * 8 * 8,)
    after = (vqgan.decoder.conv_out.weight, disc.main[0].weight)
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    with pytest.raises(ValueError, match="adv_start"):
        train_vqgan(_structured_images(4), replace(cfg, adv_start=10), steps=5, progress=False)


def test_restart_moves_dead_codes_onto_encoder_outputs():
    torch.manual_seed(0)
    vqgan = VQGAN(TINY)
    x = _structured_images(2)
    usage = torch.zeros(TINY.n_embed, dtype=torch.long)
    usage[:4] = 1  # codes 0-3 are alive and must stay
    alive = vqgan.quantize.embedding.weight[:4].detach().clone()
    n = restart_dead_codes(vqgan, x, usage, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = vqgan.quant_conv(vqgan.encoder(2 * x - 1)).permute(0, 2, 3, 1).reshape(-1, TINY.embed_dim)
    codebook = vqgan.quantize.embedding.weight.detach()
    assert n == TINY.n_embed - 4 and torch.equal(codebook[:4], alive)
    assert (codebook[4:, None, :] == h[None]).all(dim=-1).any(dim=-1).all()  # each one is some h row


def test_psnr_matches_hand_computation():
    vqgan = _frozen_tiny()
    x = _structured_images(6)
    mse = (discretize(vqgan, x) - x).square().mean().item()
    assert math.isclose(psnr(vqgan, x), 10 * math.log10(1 / mse), rel_tol=1e-6)
