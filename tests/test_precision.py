"""The precision policy (robust.models.precision) on the teacher pool's GPU work, exercised on the CPU.

torch runs bf16 autocast on the CPU too, so the bf16 paths of the teacher logits, the DAD attack and
the VQGAN round trips are compared here with fp32 on small real architectures: a random-init tiny
open_clip ViT, timm's ``test_resnet`` and a ``digits32_f4_128`` VQGAN trained briefly on the digits.
Every comparison asserts a difference above zero (the bf16 path really ran) and below a tolerance.
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import replace

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F

from robust.attacks import DADConfig, PGDConfig, dad_samples, pgd
from robust.data.digits import digits_arrays
from robust.losses.kd import soft_ce
from robust.models.clip_teacher import ClipTeacherConfig, build_clip_teacher
from robust.models.precision import autocast, autocast_dtype, teacher_logits
from robust.models.vqgan import VQGANConfig, build_vqgan, discretize
from robust.models.vqgan_train import VQGANTrainConfig, train_vqgan

torch.set_num_threads(1)

ARCH = "robust-precision-tiny-clip"
ARCH_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def clip_cfg(tmp_path_factory) -> ClipTeacherConfig:
    path = tmp_path_factory.mktemp("clip") / f"{ARCH}.json"
    path.write_text(json.dumps(ARCH_CFG))
    open_clip.add_model_config(path)  # random weights; nothing is downloaded
    return ClipTeacherConfig(arch=ARCH, pretrained="", class_names=[str(i) for i in range(10)],
                             templates=["a photo of the number {}."], cache_dir=str(path.parent / "cache"))  # fmt: skip


@pytest.fixture(scope="module")
def teacher(clip_cfg):
    torch.manual_seed(0)
    return build_clip_teacher(clip_cfg)


def _to01(x_NHWC) -> torch.Tensor:
    return torch.from_numpy(x_NHWC).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def digits():
    """(512 training images, 64 test images, their labels), in [0, 1]."""
    x_train, _, x_test, y_test = digits_arrays()
    return _to01(x_train[:512]), _to01(x_test[:64]), torch.from_numpy(y_test[:64])


@pytest.fixture(scope="module")
def vqgan(digits):
    """100 steps of the local trainer (20-40 s on one core, 24 dB). A random-init codebook sits near
    zero, where rounding flips many codes (measured: 2.6% of Q(x)'s, half of x_dad's), so only a
    trained one says what bf16 does to Q."""
    vqgan, _ = train_vqgan(digits[0], VQGANTrainConfig(), steps=100, progress=False)
    return vqgan.requires_grad_(False)


@contextlib.contextmanager
def _dtypes_seen(module: torch.nn.Module):
    """Yield {"forward": [...], "backward": [...]}: the dtypes of ``module``'s outputs and of their gradients."""
    seen = {"forward": [], "backward": []}

    def hook(_module, _inputs, out):
        seen["forward"].append(out.dtype)
        if out.requires_grad:
            out.register_hook(lambda g: seen["backward"].append(g.dtype))

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _codes(vqgan, x01_BCHW):
    with torch.no_grad():
        return vqgan.encode(2 * x01_BCHW - 1)[2]


def test_policy_resolves_per_device():
    assert autocast_dtype("auto", device="cpu") == torch.float32
    assert autocast_dtype("auto", device="cuda") == torch.bfloat16  # a device name; no GPU needed
    assert autocast_dtype("bf16", device="cpu") == torch.bfloat16
    assert autocast_dtype("fp32", device=torch.device("cuda", 0)) == torch.float32
    with autocast("bf16", device="cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast("auto", device="cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="fp16.*unknown.*'auto', 'bf16', 'fp32'"):
        autocast_dtype("fp16", device="cpu")
    with pytest.raises(ValueError, match="unknown"):
        dad_samples(torch.nn.Identity(), lambda t: t, torch.rand(1, 3, 4, 4), torch.zeros(1), DADConfig(),
                    precision="half")  # fmt: skip


def test_clip_teacher_logits_in_bf16_are_within_one_percent_of_the_logit_scale(teacher, digits):
    """logits = s * cos(f, w) with s = exp(logit_scale): the tolerance is on the cosine, |dcos| <= 0.01,
    2.6 bf16 unit roundoffs (2^-8: 8 significant bits). Measured over init seeds 0-2: max |dlogit| =
    0.0021-0.0031 s."""
    with _dtypes_seen(teacher.clip.visual.transformer.resblocks[0].mlp.c_fc) as seen:
        fp32, auto, bf16 = (teacher_logits(teacher, digits[1], precision=p) for p in ("fp32", "auto", "bf16"))
    assert seen["forward"] == [torch.float32, torch.float32, torch.bfloat16]  # "auto" is fp32 on the CPU
    assert torch.equal(auto, fp32) and bf16.dtype == torch.float32
    err = (bf16 - fp32).abs().max().item() / teacher.clip.logit_scale.exp().item()
    assert 0 < err <= 0.01, err


def test_timm_teacher_logits_in_bf16_are_within_two_percent_of_the_largest_logit(digits):
    """A convolutional teacher (conv + BatchNorm in bf16). Its random-init logits have no scale of their
    own, so the error is relative to the largest one. Measured over seeds 0-2: 0.42-0.88%."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10).eval().requires_grad_(False)
    with _dtypes_seen(model.conv1) as seen:
        fp32, bf16 = (teacher_logits(model, digits[1], precision=p) for p in ("fp32", "bf16"))
    assert seen["forward"] == [torch.float32, torch.bfloat16]
    err = ((bf16 - fp32).abs().max() / fp32.abs().max()).item()
    assert 0 < err <= 0.02, err


def test_pgd_in_bf16_runs_the_backward_in_bf16_and_the_step_in_fp32(teacher):
    """One unclipped L2 step: its length is alpha to fp32 precision (measured error <= 1.2e-7; rounding
    the pixels to bf16 would put it off by ~0.05) and its direction that of the fp32 attack (measured
    cosine >= 0.99993 over teacher seeds 0-2)."""
    x = 0.25 + 0.5 * torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # no clipping
    y = torch.arange(16) % 10
    cfg = PGDConfig(norm="l2", eps=1.0, alpha=0.5, steps=1, random_start_prob=0.0)
    with _dtypes_seen(teacher.clip.visual.transformer.resblocks[0].mlp.c_fc) as seen:
        adv = {p: pgd(lambda x, y: soft_ce(teacher(x), y), x, y, cfg, precision=p) for p in ("fp32", "bf16")}
    assert seen == {"forward": [torch.float32, torch.bfloat16], "backward": [torch.float32, torch.bfloat16]}
    step_bf16, step_fp32 = (adv[p] - x for p in ("bf16", "fp32"))
    assert adv["bf16"].dtype == torch.float32
    torch.testing.assert_close(step_bf16.flatten(1).norm(dim=1), torch.full((16,), 0.5), rtol=0, atol=1e-5)
    cos = F.cosine_similarity(step_bf16.flatten(1), step_fp32.flatten(1))
    assert cos.min() > 0.999 and not torch.equal(step_bf16, step_fp32)


def test_discretize_in_bf16_flips_few_codes(vqgan, digits):
    """Q(x) in bf16 vs fp32. Measured over trainer seeds 0-1: mean |dpixel| 0.0012-0.0014, codes flipped
    0.9-1.5% (only near-ties between two codes can flip: the search itself is fp32)."""
    x, searched = digits[1], []
    handle = vqgan.quantize.register_forward_pre_hook(lambda _m, inputs: searched.append(inputs[0].dtype))
    with _dtypes_seen(vqgan.encoder.conv_out) as seen:
        fp32, auto, bf16 = (discretize(vqgan, x, precision=p) for p in ("fp32", "auto", "bf16"))
    handle.remove()
    assert seen["forward"] == [torch.float32, torch.float32, torch.bfloat16] and searched == [torch.float32] * 3
    assert torch.equal(auto, fp32) and bf16.dtype == torch.float32
    mad = (bf16 - fp32).abs().mean().item()
    flipped = (_codes(vqgan, bf16) != _codes(vqgan, fp32)).float().mean().item()
    assert 0 < mad <= 0.005 and 0 < flipped <= 0.03, (mad, flipped)


def test_dad_samples_in_bf16_are_close_to_fp32(teacher, vqgan, digits):
    """The teacher pool's DAD work end to end, all bf16 vs all fp32, with the local budget (L2 eps =
    alpha = 1 at 32 px) and the same random start. Measured over teacher seeds 0-2 x trainer seeds 0-1:
    mean |dpixel| 0.0018-0.0025, 1.2-2.4% of the codes of x_dad flipped, 11-15% of the attack's own
    mean change."""
    _, x, y = digits
    cfg = DADConfig(eps=1.0, alpha=1.0)
    mlp = teacher.clip.visual.transformer.resblocks[0].mlp.c_fc
    with _dtypes_seen(mlp) as in_teacher, _dtypes_seen(vqgan.encoder.conv_out) as in_vqgan:
        x_dad = {
            p: dad_samples(teacher, functools.partial(discretize, vqgan, precision=p), x, y, cfg,
                           generator=torch.Generator().manual_seed(0), precision=p)  # fmt: skip
            for p in ("fp32", "bf16")
        }
    # per run: one attack forward and backward, two VQGAN round trips
    assert in_teacher == {"forward": [torch.float32, torch.bfloat16], "backward": [torch.float32, torch.bfloat16]}
    assert in_vqgan["forward"] == [torch.float32] * 2 + [torch.bfloat16] * 2
    mad = (x_dad["bf16"] - x_dad["fp32"]).abs().mean().item()
    flipped = (_codes(vqgan, x_dad["bf16"]) != _codes(vqgan, x_dad["fp32"])).float().mean().item()
    attack = (x_dad["fp32"] - discretize(vqgan, x, precision="fp32")).abs().mean().item()
    assert 0 < mad <= 0.005 and 0 < flipped <= 0.05 and mad < 0.25 * attack, (mad, flipped, attack)


def test_compiled_teacher_and_vqgan_match_eager(clip_cfg):
    """``compile=True`` compiles in place (same state_dict) and gives the eager outputs (fp32: the
    kernels may only reorder sums)."""
    # one resolution level (taming's GroupNorm needs 32 channels): inductor compiles small graphs faster
    vq_cfg = VQGANConfig(resolution=32, ch=32, ch_mult=[1], num_res_blocks=1, attn_resolutions=[], z_channels=4,
                         embed_dim=4, n_embed=8)  # fmt: skip
    models = {}
    for compile_ in (False, True):
        torch.manual_seed(0)
        clip_teacher = build_clip_teacher(replace(clip_cfg, compile=compile_))
        torch.manual_seed(0)
        models[compile_] = clip_teacher, build_vqgan(replace(vq_cfg, compile=compile_))
    (eager_teacher, eager_vqgan), (compiled_teacher, compiled_vqgan) = models[False], models[True]
    for eager, compiled in zip(models[False], models[True], strict=True):
        torch.testing.assert_close(compiled.state_dict(), eager.state_dict(), rtol=0, atol=0)
    traced = []
    for module in (compiled_teacher.clip.visual, compiled_vqgan.encoder, compiled_vqgan.decoder):
        module.register_forward_hook(lambda *_: traced.append(torch.compiler.is_compiling()))
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(teacher_logits(compiled_teacher, x), teacher_logits(eager_teacher, x))
    torch.testing.assert_close(discretize(compiled_vqgan, x), discretize(eager_vqgan, x), atol=1e-5, rtol=0)
    assert traced == [True, True, True]


@pytest.mark.cuda  # "auto" is bf16 and channels_last applies on CUDA only
def test_clip_teacher_on_cuda_defaults_to_bf16_channels_last(clip_cfg, digits):
    torch.manual_seed(0)
    teacher = build_clip_teacher(clip_cfg, device="cuda")
    assert teacher.clip.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with _dtypes_seen(teacher.clip.visual.transformer.resblocks[0].mlp.c_fc) as seen:
        auto, fp32 = (teacher_logits(teacher, digits[1].cuda(), precision=p) for p in ("auto", "fp32"))
    assert seen["forward"] == [torch.bfloat16, torch.float32]
    assert (auto - fp32).abs().max().item() <= 0.01 * teacher.clip.logit_scale.exp().item()
