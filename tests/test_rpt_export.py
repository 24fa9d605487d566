"""robust.rpt.export: export -> load restores every method's student bitwise; RptClassifier scored by the evaluator."""

from __future__ import annotations

import dataclasses

import json

import open_clip
import pytest
import torch

from robust.eval.metrics import classification_tally
from robust.models.clip_teacher import ClipTeacherConfig
from robust.models.timm_models import TimmConfig, build_timm, export_timm
from robust.rpt.baselines import build_method, wise_ft
from robust.eval.evaluate import evaluate_batch
from robust.rpt.export import RptClassifier, export_rpt, is_rpt_export, load_rpt
from robust.rpt.partial import PartialConfig, build_partial
from robust.rpt.select import SelectConfig, predict, selection_tally
from robust.rpt.zeroshot import ClassEmbeddingHead

torch.set_num_threads(1)

CFGS = {
    "test_vit": PartialConfig(timm=TimmConfig(name="test_vit", num_classes=10, img_size=32), tune_from_block=4),
    "test_resnet": PartialConfig(timm=TimmConfig(name="test_resnet", num_classes=10), tune_from_block=2),
}
CFGS = {name: dataclasses.replace(cfg, vpt_prompts=3) for name, cfg in CFGS.items()}  # a small VPT
SELECT = SelectConfig(passes=4, rule="umc_kl")


def _trained(method: str, cfg: PartialConfig, *, seed: int = 3):
    """A student whose every floating tensor (weights, BatchNorm statistics) moved away from any random init."""
    torch.manual_seed(seed)
    student = build_method(method, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in student.state_dict().values():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g))
    return student


def _x(b: int = 5) -> torch.Tensor:
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_three_head_student_round_trips_bitwise_with_the_same_mc_selection(tmp_path, name):
    cfg = CFGS[name]
    student = _trained("rpt", cfg)
    weights = export_rpt(student, tmp_path, stem="rpt", method="rpt", cfg=cfg, select=SELECT)
    meta = json.loads((tmp_path / "rpt.json").read_text())
    assert weights == tmp_path / "rpt.safetensors" and is_rpt_export(tmp_path / "rpt.json")
    size = {"test_vit": 32, "test_resnet": 160}[name]  # img_size=32 / timm's default input size
    assert (meta["kind"], meta["method"], meta["num_classes"]) == ("rpt", "rpt", 10)
    assert meta["input_size"] == [3, size, size]
    assert meta["param_counts"] == student.param_counts() and meta["select"] == {"passes": 4, "rule": "umc_kl"}
    assert meta["heads"] == ["clean", "unclean", "combined"]

    before = torch.randn(3)
    torch.manual_seed(7)
    expect = torch.randn(3)
    torch.manual_seed(7)
    loaded = load_rpt(tmp_path, stem="rpt")
    assert torch.equal(torch.randn(3), expect)  # loading leaves the caller's random stream alone
    assert not torch.equal(before, expect)
    assert isinstance(loaded, RptClassifier) and not loaded.training and loaded.select == SELECT
    assert _same_state(loaded.student, student)

    x = _x()
    torch.manual_seed(11)
    want = predict(student, x, cfg=SELECT)
    torch.manual_seed(11)
    got = loaded(x)
    assert torch.equal(got, want.logits_BK) and torch.equal(loaded.last_selection.chose_clean_B, want.chose_clean_B)
    # MC dropout really ran: another seed gives other MC means
    torch.manual_seed(12)
    assert not torch.equal(loaded(x), got)


@pytest.mark.parametrize(
    ("name", "method"),
    [("test_vit", "apt"), ("test_vit", "linear_probe"), ("test_vit", "vpt"), ("test_vit", "full_finetune"),
     ("test_resnet", "single_teacher"), ("test_resnet", "full_finetune")],
)  # fmt: skip
def test_one_head_methods_round_trip_to_identical_logits(tmp_path, name, method):
    cfg = CFGS[name]
    student = _trained(method, cfg)
    export_rpt(student, tmp_path, method=method, cfg=cfg)
    loaded = load_rpt(tmp_path / "model.json")  # the .json path works as well as the folder
    assert not loaded.routes and _same_state(loaded.student, student)
    x = _x()
    assert torch.equal(loaded(x), student.eval()(x)["combined"]) and loaded.last_selection is None
    assert json.loads((tmp_path / "model.json").read_text())["param_counts"] == student.param_counts()


def test_wise_ft_interpolation_exports_as_a_full_finetune_model(tmp_path):
    cfg = CFGS["test_resnet"]
    torch.manual_seed(0)
    theta_0 = build_method("full_finetune", cfg).state_dict()
    finetuned = _trained("full_finetune", cfg)
    mixed = build_method("full_finetune", cfg)
    mixed.load_state_dict(wise_ft(theta_0, finetuned.state_dict(), 0.5))
    export_rpt(mixed, tmp_path, method="full_finetune", cfg=cfg)
    loaded = load_rpt(tmp_path)
    x = _x()
    assert torch.equal(loaded(x), mixed.eval()(x)["combined"])
    assert not torch.equal(loaded(x), finetuned.eval()(x)["combined"])
    w_0, w_ft = theta_0["tuned.heads.combined.fc.weight"], finetuned.tuned.heads["combined"].fc.weight
    torch.testing.assert_close(loaded.student.tuned.heads["combined"].fc.weight, 0.5 * (w_0 + w_ft))


def test_open_clip_zero_shot_student_round_trips_with_its_logit_scale(tmp_path):
    arch = "robust-test-rpt-export-clip"
    tiny = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                            "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}  # fmt: skip
    (tmp_path / f"{arch}.json").write_text(json.dumps(tiny))
    open_clip.add_model_config(tmp_path / f"{arch}.json")
    clip = ClipTeacherConfig(arch=arch, pretrained="", class_names=["cat", "dog", "tree"], templates=["a {}."],
                             cache_dir=str(tmp_path / "cache"))  # fmt: skip
    cfg = PartialConfig(source="open_clip", clip=clip, tune_from_block=1)
    student = _trained("rpt", cfg)
    for m in student.modules():  # a pretrained CLIP's scale (100), not a random init's (1 / 0.07)
        if isinstance(m, ClassEmbeddingHead):
            m.logit_scale.fill_(100.0)
    export_rpt(student, tmp_path / "out", method="rpt", cfg=cfg, select=SELECT)
    loaded = load_rpt(tmp_path / "out")
    assert _same_state(loaded.student, student)
    assert loaded.student.tuned.heads["clean"].shell.head.logit_scale.item() == 100.0
    x = _x()
    torch.manual_seed(5)
    want = predict(student, x, cfg=SELECT).logits_BK
    torch.manual_seed(5)
    assert torch.equal(loaded(x), want)


def test_evaluator_counts_accuracy_and_f_correct_like_selection_tally(tmp_path):
    cfg = CFGS["test_vit"]
    student = _trained("rpt", cfg)
    export_rpt(student, tmp_path, method="rpt", cfg=cfg, select=SELECT)
    model = load_rpt(tmp_path)
    x, y = _x(8), torch.arange(8) % 10
    torch.manual_seed(2)
    sel = predict(student, x, cfg=SELECT)
    for key, shifted in (("clean", False), (("fog", 3), True)):
        torch.manual_seed(2)
        tally = evaluate_batch(model, x, y, key=key, shifted=shifted)
        want = selection_tally(sel, y, key=key, shifted=shifted)
        assert tally.stats.keys() == want.stats.keys() == {key}
        assert all(torch.equal(tally.stats[key][k], v) for k, v in want.stats[key].items())
        # F_correct by hand: the clean head is right in distribution, the unclean one on shifted data
        right = (sel.chose_clean_B != shifted).double().mean().item()
        assert tally.f_correct(key) == pytest.approx(right)
    # uint8 input is scaled to [0, 1] like every evaluated model's
    torch.manual_seed(2)
    tally_u8 = evaluate_batch(model, (x * 255).round().to(torch.uint8), y, key="clean", shifted=False)
    assert tally_u8.stats["clean"]["routed_n"].item() == 8


def test_one_head_method_has_no_routing(tmp_path):
    cfg = CFGS["test_resnet"]
    student = _trained("apt", cfg)
    export_rpt(student, tmp_path, method="apt", cfg=cfg)
    model = load_rpt(tmp_path)
    x, y = _x(6), torch.arange(6)
    tally = evaluate_batch(model, x, y, key="clean", shifted=False)
    want = classification_tally(student.eval()(x)["combined"], y, key="clean")
    assert tally.stats["clean"].keys() == want.stats["clean"].keys() and "routed_n" not in tally.stats["clean"]
    assert all(torch.equal(tally.stats["clean"][k], v) for k, v in want.stats["clean"].items())


def test_is_rpt_export_tells_rpt_exports_from_timm_exports(tmp_path):
    timm_cfg = TimmConfig(name="test_resnet", num_classes=10)
    export_timm(build_timm(timm_cfg), timm_cfg, tmp_path / "timm")  # timm's config.json + model.safetensors
    assert not is_rpt_export(tmp_path / "timm" / "config.json")
    assert not is_rpt_export(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="model.json"):
        load_rpt(tmp_path / "timm")  # its model.safetensors has no model.json beside it
    (tmp_path / "timm" / "model.json").write_text((tmp_path / "timm" / "config.json").read_text())
    with pytest.raises(ValueError, match="not an RPT export"):
        load_rpt(tmp_path / "timm")


def test_bad_input_is_a_clear_error(tmp_path):
    cfg = CFGS["test_resnet"]
    student = _trained("rpt", cfg)
    with pytest.raises(ValueError, match="method 'rtp' is unknown"):
        export_rpt(student, tmp_path, method="rtp", cfg=cfg)
    with pytest.raises(ValueError, match="passes=1"):
        export_rpt(student, tmp_path, method="rpt", cfg=cfg, select=SelectConfig(passes=1))
    with pytest.raises(ValueError, match="expected .*nothing.json and .*nothing.safetensors"):
        load_rpt(tmp_path / "nothing")
    export_rpt(student, tmp_path, method="rpt", cfg=cfg)
    meta = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**meta, "method": "apt"}))  # weights of three heads, one built
    with pytest.raises(ValueError, match="unexpected keys"):
        load_rpt(tmp_path)
    two_heads = build_partial(PartialConfig(timm=cfg.timm, tune_from_block=2, heads=["clean", "combined"]))
    with pytest.raises(ValueError, match="a classifier needs all of"):
        RptClassifier(two_heads, SELECT)
