"""robust.rpt.partial: the split M_b / M_s / heads of timm models, frozen-part guarantees, feature cache."""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch

from robust.models.timm_models import TimmConfig, build_timm
from robust.rpt.losses import RptLossConfig, rpt_loss
from robust.rpt.partial import HEADS, PartialConfig, build_partial, param_ids

torch.set_num_threads(1)

VIT = TimmConfig(name="test_vit", num_classes=10, img_size=32)


def _cfg(name: str = "test_vit", **kw) -> PartialConfig:
    timm_cfg = VIT if name == "test_vit" else TimmConfig(name=name, num_classes=10)
    return PartialConfig(timm=timm_cfg, **kw)


def _batch(b: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (b,), generator=g)
    is_aug = torch.arange(b) % 2 == 1
    return x, y, is_aug, torch.randn(b, 10, generator=g), torch.randn(b, 10, generator=g)


@pytest.mark.parametrize(("name", "block"), [("test_vit", 4), ("test_resnet", 2), ("test_byobnet", 2)])
def test_every_head_starts_as_the_original_model(name, block):
    torch.manual_seed(0)
    original = build_timm(_cfg(name).timm).eval()
    torch.manual_seed(0)
    student = build_partial(_cfg(name, tune_from_block=block)).eval()
    x = _batch()[0]
    out = student(x)
    assert list(out) == list(HEADS)
    for logits in out.values():
        torch.testing.assert_close(logits, original(x), rtol=1e-5, atol=1e-5)
    assert student.info["tune_from_block"] == block


@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_frozen_part_is_bitwise_unchanged_and_never_in_the_optimizer(name):
    torch.manual_seed(0)
    student = build_partial(_cfg(name, tune_from_block=2 if name == "test_resnet" else 4)).train()
    frozen = {k: v.clone() for k, v in student.backbone.state_dict().items()}  # BatchNorm statistics included
    tuned = {k: v.clone() for k, v in student.tuned.state_dict().items()}
    opt = torch.optim.Adam(student.trainable_parameters(), lr=1e-2)
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    assert in_opt.isdisjoint(param_ids(student.backbone)) and in_opt == param_ids(student.tuned)
    assert not student.backbone.training and not any(p.requires_grad for p in student.backbone.parameters())
    x, y, is_aug, t_init, t_rob = _batch()
    for _ in range(3):
        feats = student.backbone_features(x)
        assert not feats.requires_grad
        loss, _ = rpt_loss(student.heads_forward(feats), y, is_aug_B=is_aug, t_init_logits=t_init,
                           t_robust_logits=t_rob, cfg=RptLossConfig())  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = student.backbone.state_dict()
    assert frozen.keys() == after.keys() and all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert all(p.grad is None for p in student.backbone.parameters())
    changed = {k.split(".")[0] + "." + k.split(".")[1] for k, v in student.tuned.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, tuned[k])}  # fmt: skip
    assert {"heads.clean", "heads.unclean", "heads.combined"} <= changed


def test_dropout_is_the_tuned_units_own_and_the_heads_not_a_block_input():
    vit = build_partial(_cfg("test_vit", tune_from_block=4, dropout=0.25))
    assert vit.info["shared_units"] == ["blocks.4", "blocks.5"]
    shared_drops = [m for m in vit.tuned.shared.modules() if isinstance(m, torch.nn.Dropout)]
    # each tuned block's own attn_drop, proj_drop, mlp drop1 and drop2; nothing on the blocks' inputs
    assert len(shared_drops) == 2 * 4 and all(m.p == 0.25 for m in shared_drops)
    assert not any(isinstance(m, torch.nn.Dropout) for m in vit.tuned.shared.children())
    assert all(head.drop.p == 0.25 for head in vit.tuned.heads.values())  # before each head's classifier
    frozen_drops = [m for m in vit.backbone.modules() if isinstance(m, torch.nn.Dropout)]
    assert frozen_drops and all(m.p == 0.0 for m in frozen_drops)  # M_b keeps the model's own (0)
    # a ResNet's blocks have no dropout of their own: in train mode its shared section is deterministic
    resnet = build_partial(_cfg("test_resnet", tune_from_block=1, dropout=0.25)).train()
    feats = resnet.backbone_features(_batch()[0])
    with torch.no_grad():
        torch.manual_seed(0)
        a = resnet.tuned.shared(feats)
        torch.manual_seed(1)
        b = resnet.tuned.shared(feats)
    torch.testing.assert_close(a, b)


def test_param_counts_of_test_vit_by_hand():
    D, H, C, P, tokens = 64, 192, 10, 16, (32 // 16) ** 2 + 1  # test_vit: dim 64, mlp ratio 3, 6 blocks
    block = 2 * (2 * D) + (D * 3 * D + 3 * D) + (D * D + D) + (D * H + H) + (H * D + D)  # 2 norms, qkv, proj, mlp
    stem = (3 * P * P * D + D) + D + tokens * D  # patch conv, class token, position embedding
    norm, classifier = 2 * D, D * C + C
    model_total = stem + 6 * block + norm + classifier
    # tuning blocks 4, 5, the final norm and the classifier: norm + classifier stay within a fifth of that,
    # with block 5 they would not, so the heads are copies of the norm and the classifier
    assert norm + classifier <= (2 * block + norm + classifier) / 5 < block + norm + classifier
    student = build_partial(_cfg(tune_from_block=4))
    assert student.info["shared_units"] == ["blocks.4", "blocks.5"] and student.info["head_units"] == ["norm"]
    tuned = 2 * block + 3 * (norm + classifier)
    assert student.param_counts() == {"tuned": tuned, "total": stem + 4 * block + tuned}
    # a fraction picks the fewest trailing blocks whose parameters reach it
    assert (2 * block + norm + classifier) / model_total > 0.2 > (block + norm + classifier) / model_total
    assert build_partial(_cfg(tune_fraction=0.2)).info["tune_from_block"] == 4
    assert build_partial(_cfg(tune_fraction=0.1)).info["tune_from_block"] == 5
    # tune_from_block wins over the (default) fraction; depth = only the final norm and the classifier
    only_head = build_partial(_cfg(tune_from_block=6))
    assert only_head.info["shared_units"] == ["norm"] and only_head.info["head_units"] == []
    assert only_head.param_counts()["tuned"] == norm + 3 * classifier


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"tune_fraction": 0.0}, r"in \(0, 1\)"),
        ({"tune_fraction": 1.0}, r"in \(0, 1\)"),
        ({"tune_fraction": -0.5}, r"in \(0, 1\)"),
        ({"tune_from_block": 7}, "past the depth.*6 blocks"),
        ({"tune_from_block": -1}, "past the depth"),
        ({"tune_fraction": None}, "set tune_fraction"),
        ({"heads": ["clean", "robust"]}, "distinct names"),
        ({"heads": ["combined", "combined"]}, "distinct names"),
        ({"heads": []}, "distinct names"),
        ({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
        ({"source": "keras"}, "source='keras' is unknown"),
    ],
)
def test_bad_input_is_a_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        build_partial(_cfg(**kw))


def test_models_that_do_not_run_their_blocks_in_order_are_refused():
    # NFNet applies a parameter-free activation after its last conv, which a block split would reorder
    with pytest.raises(ValueError, match="does not reproduce the model's logits"):
        build_partial(_cfg("test_nfnet", tune_from_block=2))


def test_training_from_cached_features_equals_the_uncached_path(tmp_path):
    torch.manual_seed(0)
    uncached = build_partial(_cfg(tune_from_block=4)).train()
    cached, initial = copy.deepcopy(uncached), copy.deepcopy(uncached.tuned.state_dict())
    x, y, is_aug, t_init, t_rob = _batch()
    # the cache: M_b's output written once and read back (a shard, here a safetensors file)
    safetensors.torch.save_file({"feats": cached.backbone_features(x)}, str(tmp_path / "feats.safetensors"))
    feats = safetensors.torch.load_file(str(tmp_path / "feats.safetensors"))["feats"]
    kw = {"is_aug_B": is_aug, "t_init_logits": t_init, "t_robust_logits": t_rob, "cfg": RptLossConfig()}
    results = []
    for student, inputs in ((uncached, None), (cached, feats)):
        opt = torch.optim.Adam(student.trainable_parameters(), lr=1e-3)
        torch.manual_seed(1)  # the same dropout masks on both paths
        logits = student(x) if inputs is None else student.heads_forward(inputs)
        loss, _ = rpt_loss(logits, y, **kw)
        opt.zero_grad()
        loss.backward()
        opt.step()
        results.append((loss.detach(), student.tuned.state_dict()))
    (loss_a, state_a), (loss_b, state_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not torch.equal(state_a["heads.clean.shell.head.weight"], initial["heads.clean.shell.head.weight"])


def test_backbone_key_follows_the_frozen_part_only():
    torch.manual_seed(0)
    student = build_partial(_cfg(tune_from_block=4))
    key = student.backbone_key()
    other = copy.deepcopy(student)
    with torch.no_grad():
        next(other.tuned.parameters()).add_(1.0)  # tuning does not invalidate cached features
    assert other.backbone_key() == key
    with torch.no_grad():
        next(other.backbone.parameters()).add_(1e-3)
    assert other.backbone_key() != key
    torch.manual_seed(0)
    assert build_partial(_cfg(tune_from_block=3)).backbone_key() != key  # another cut, other features


def test_configs_load_from_dotlists_and_reject_typos():
    from robust.config import load_config
    from robust.rpt.losses import RptLossConfig
    from robust.rpt.select import SelectConfig

    cfg = load_config(PartialConfig, overrides=["timm.name=test_vit", "tune_from_block=3", "heads=[combined]"])
    assert (cfg.timm.name, cfg.tune_from_block, cfg.tune_fraction, cfg.heads) == ("test_vit", 3, 0.05, ["combined"])
    assert load_config(PartialConfig, overrides=["tune_fraction=null"]).tune_fraction is None
    assert load_config(SelectConfig, overrides=["rule=no_kl", "passes=4"]) == SelectConfig(passes=4, rule="no_kl")
    assert load_config(RptLossConfig, overrides=["kd_weight=0"]).kd_weight == 0.0
    with pytest.raises(ValueError, match="tune_fractoin"):
        load_config(PartialConfig, overrides=["tune_fractoin=0.1"])
