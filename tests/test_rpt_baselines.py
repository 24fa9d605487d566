"""robust.rpt.baselines: WiSE-FT, linear probe, full fine-tuning, VPT and the method table."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from robust.models.timm_models import TimmConfig, build_timm
from robust.rpt.baselines import METHODS, build_method, build_vpt, method_loss_config, wise_ft
from robust.rpt.losses import RptLossConfig
from robust.rpt.partial import PartialConfig, param_ids

torch.set_num_threads(1)

VIT = PartialConfig(timm=TimmConfig(name="test_vit", num_classes=10, img_size=32), tune_from_block=4)
D, C = 64, 10  # test_vit width, classes


def _endpoints():
    torch.manual_seed(0)
    model = build_timm(TimmConfig(name="test_resnet", num_classes=C)).model
    theta_0 = copy.deepcopy(model.state_dict())
    model(torch.rand(4, 3, 32, 32))  # a training-mode pass moves the BatchNorm statistics and counters
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model, theta_0, copy.deepcopy(model.state_dict())


def test_wise_ft_reproduces_both_endpoints_exactly_and_interpolates_between():
    model, theta_0, theta_ft = _endpoints()
    for alpha, want in ((0.0, theta_0), (1.0, theta_ft)):
        mixed = wise_ft(theta_0, theta_ft, alpha)
        assert mixed.keys() == want.keys() and all(torch.equal(mixed[k], want[k]) for k in want)
    mixed = wise_ft(theta_0, theta_ft, 0.3)
    for key, a in theta_0.items():
        if a.is_floating_point():
            torch.testing.assert_close(mixed[key], 0.7 * a + 0.3 * theta_ft[key])
        else:  # num_batches_tracked: from the nearer endpoint
            assert torch.equal(mixed[key], a)
    model.load_state_dict(mixed)  # a loadable state dict of the same model
    assert not torch.equal(theta_0["fc.weight"], theta_ft["fc.weight"])


def test_wise_ft_bad_input():
    _, theta_0, theta_ft = _endpoints()
    with pytest.raises(ValueError, match=r"alpha=1.5 must be in \[0, 1\]"):
        wise_ft(theta_0, theta_ft, 1.5)
    with pytest.raises(ValueError, match="differ in keys"):
        wise_ft(theta_0, {k: v for k, v in theta_ft.items() if k != "fc.bias"}, 0.5)
    with pytest.raises(ValueError, match="same architecture"):
        wise_ft(theta_0, {**theta_ft, "fc.bias": torch.zeros(3)}, 0.5)


def test_linear_probe_tunes_only_the_classifier_and_starts_as_the_model():
    torch.manual_seed(0)
    original = build_timm(VIT.timm).eval()
    torch.manual_seed(0)
    lp = build_method("linear_probe", VIT)
    assert lp.param_counts() == {"tuned": D * C + C, "total": sum(p.numel() for p in original.parameters())}
    assert [n for n, p in lp.named_parameters() if p.requires_grad] == ["tuned.heads.combined.weight",
                                                                         "tuned.heads.combined.bias"]  # fmt: skip
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(lp.eval()(x)["combined"], original(x))
    assert lp.backbone_features(x).shape == (3, D)  # pooled features: a linear probe caches D floats per image


def test_full_finetune_freezes_nothing():
    ft = build_method("full_finetune", VIT)
    counts = ft.param_counts()
    assert counts["tuned"] == counts["total"] == sum(p.numel() for p in build_timm(VIT.timm).parameters())
    assert sum(p.numel() for p in ft.backbone.parameters()) == 0


def test_vpt_adds_exactly_n_prompts_times_dim_tuned_parameters():
    n = 5
    torch.manual_seed(0)
    vpt, lp = build_method("vpt", dataclasses.replace(VIT, vpt_prompts=n)), build_method("linear_probe", VIT)
    assert vpt.param_counts()["tuned"] - lp.param_counts()["tuned"] == n * D
    assert vpt.param_counts()["total"] - lp.param_counts()["total"] == n * D
    tuned_names = [name for name, p in vpt.named_parameters() if p.requires_grad]
    assert tuned_names == ["tuned.shared.prompts_PD", "tuned.heads.combined.shell.head.weight",
                           "tuned.heads.combined.shell.head.bias"]  # fmt: skip


def test_vpt_trains_the_prompts_and_classifier_and_leaves_the_blocks_alone():
    torch.manual_seed(0)
    vpt = build_vpt(VIT, n_prompts=3).train()
    blocks = copy.deepcopy(vpt.tuned.shared.blocks.state_dict())
    prompts = vpt.tuned.shared.prompts_PD.detach().clone()
    opt = torch.optim.Adam(vpt.trainable_parameters(), lr=1e-2)
    assert {id(p) for g in opt.param_groups for p in g["params"]}.isdisjoint(param_ids(vpt.tuned.shared.blocks))
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(vpt(x)["combined"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(v, vpt.tuned.shared.blocks.state_dict()[k]) for k, v in blocks.items())
    assert not torch.equal(prompts, vpt.tuned.shared.prompts_PD)
    assert not vpt.tuned.shared.blocks.training  # frozen blocks stay in eval mode


def test_vpt_needs_a_vit_and_at_least_one_prompt():
    with pytest.raises(ValueError, match="not a timm ViT"):
        build_vpt(PartialConfig(timm=TimmConfig(name="test_resnet", num_classes=C)), n_prompts=4)
    with pytest.raises(ValueError, match="vpt_prompts=0"):
        build_vpt(VIT, n_prompts=0)


def test_method_table_builds_each_student_with_its_loss():
    base = RptLossConfig(tau=2.0, kd_weight=0.5)
    x = torch.rand(2, 3, 32, 32)
    for name, method in METHODS.items():
        student = build_method(name, dataclasses.replace(VIT, vpt_prompts=2))
        assert student.head_names == method.heads
        assert all(v.shape == (2, C) for v in student(x).values())
        loss = method_loss_config(name, base)
        assert loss.tau == 2.0 and loss.kd_weight == (0.5 if method.kd else 0.0)
    assert method_loss_config("only_kd", base).clean_teacher == "robust"
    assert method_loss_config("single_teacher", base).clean_teacher == "initial"
    # APT tunes the same layers as RPT, with one head
    rpt, apt = build_method("rpt", VIT), build_method("apt", VIT)
    assert (rpt.info["shared_units"], rpt.info["head_units"]) == (apt.info["shared_units"], apt.info["head_units"])
    with pytest.raises(ValueError, match="method 'lora' is unknown"):
        build_method("lora", VIT)
