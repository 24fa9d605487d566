"""robust.rpt.select: eq. 6 head selection on hand-made head outputs, MC dropout through the tuned part only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robust.eval.metrics import summarize
from robust.models.timm_models import TimmConfig
from robust.rpt.partial import PartialConfig, build_partial
from robust.rpt.select import SelectConfig, mc_head_logits, predict, select_heads, selection_tally

torch.set_num_threads(1)

K = 4  # MC passes
ALT = np.array([1.0, -1.0, 1.0, -1.0])  # a pass-to-pass alternation


def _head(*samples: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.stack(samples, axis=1), dtype=torch.float32)  # (K, B, C)


def _const(v, noise=0.0, on=0) -> np.ndarray:
    out = np.tile(np.array(v, dtype=np.float64), (K, 1))
    out[:, on] += noise * ALT
    return out


def _alt(a, b) -> np.ndarray:
    return np.stack([a, b, a, b]).astype(np.float64)


# Four samples, each a (K, C=3) block of logits per head:
# 0: clean head confident and in line with the combined head, unclean head erratic -> every rule: clean
# 1: clean head steady but far from the combined head (tiny U_mc, big KL); unclean noisy but close to it
# 2: clean head close to the combined head but noisy; unclean head steady (tiny U_mc) but further away
# 3: three identical heads -> every score ties -> clean
SHARED = _alt([0, 1, 0], [0, 0, 1])
MC = {
    "clean": _head(_const([4, 0, 0], 0.01), _const([5, 0, 0], 0.5), _alt([0, 0, 3.5], [0, 0, 1]), SHARED),
    "unclean": _head(_alt([0, 2, 0], [0, 0, 2]), _alt([0, 3, 0], [0, 1.5, 0]), _const([0, 0, 6], 0.01, 2), SHARED),
    "combined": _head(_const([3, 0, 0]), _const([0, 4, 0]), _const([0, 0, 3]), SHARED),
}
EXPECTED = {  # chose_clean per sample, worked out from the scores below
    "umc_kl": [True, False, False, True],
    "no_kl": [True, True, False, True],
    "no_umc": [True, False, True, True],
    "max_logit": [True, True, False, True],
}


def _scores_by_hand(rule: str) -> dict[str, np.ndarray]:
    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p_m = softmax(MC["combined"].double().numpy()).mean(0)
    out = {}
    for head in ("clean", "unclean"):
        z = MC[head].double().numpy()
        p = softmax(z)
        mean = p.mean(0)
        pred = mean.argmax(-1)
        umc = p.std(0, ddof=1)[np.arange(len(pred)), pred]  # std over the K passes at the predicted class
        kl = (p_m * (np.log(p_m) - np.log(mean))).sum(-1)  # KL(p_combined || p_head)
        out[head] = {"umc_kl": umc * kl, "no_kl": umc, "no_umc": kl, "max_logit": -z.mean(0).max(-1)}[rule]
    return out


@pytest.mark.parametrize("rule", list(EXPECTED))
def test_selection_picks_the_head_the_formula_says(rule):
    sel = select_heads(MC, rule=rule)
    want = _scores_by_hand(rule)
    for head in ("clean", "unclean"):
        np.testing.assert_allclose(sel.score[head].double().numpy(), want[head], rtol=2e-4, atol=1e-7)
    assert sel.chose_clean_B.tolist() == EXPECTED[rule]
    assert (want["clean"] <= want["unclean"]).tolist() == EXPECTED[rule]
    # the prediction is the picked head's MC-mean distribution
    for i, clean in enumerate(EXPECTED[rule]):
        mean = MC["clean" if clean else "unclean"][:, i].softmax(-1).mean(0)
        torch.testing.assert_close(sel.logits_BK[i].exp(), mean)


def test_the_ablations_disagree_on_these_samples():
    picks = {tuple(select_heads(MC, rule=rule).chose_clean_B.tolist()) for rule in EXPECTED}
    assert len(picks) == 3  # eq. 6, "w/o KL" and "w/o U_mc" each route some sample differently


def test_bad_selection_input_is_a_clear_error():
    with pytest.raises(ValueError, match="needs >= 2"):
        select_heads({h: v[:1] for h, v in MC.items()})
    with pytest.raises(ValueError, match="rule='entropy' is unknown"):
        select_heads(MC, rule="entropy")
    with pytest.raises(ValueError, match="needs the heads"):
        select_heads({"combined": MC["combined"], "clean": MC["clean"]})
    student = build_partial(PartialConfig(timm=TimmConfig(name="test_vit", num_classes=3, img_size=32)))
    with pytest.raises(ValueError, match="passes=1"):
        predict(student, torch.rand(2, 3, 32, 32), cfg=SelectConfig(passes=1))


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_mc_dropout_runs_the_backbone_once_and_the_tuned_part_k_times():
    torch.manual_seed(0)
    student = build_partial(PartialConfig(timm=TimmConfig(name="test_vit", num_classes=10, img_size=32),
                                          tune_from_block=4)).train()  # fmt: skip
    backbone = _count_calls(student.backbone)
    patch_embed = _count_calls(student.backbone.trunk.model.patch_embed)  # the frozen work itself
    shared_block = _count_calls(student.tuned.shared[1])
    classifier = _count_calls(student.tuned.heads["unclean"].shell.head)
    sel = predict(student, torch.rand(5, 3, 32, 32), cfg=SelectConfig(passes=7))
    assert (backbone[0], patch_embed[0], shared_block[0], classifier[0]) == (1, 1, 7, 7)
    assert sel.logits_BK.shape == (5, 10) and sel.chose_clean_B.dtype == torch.bool
    assert (sel.score["clean"] > 0).all()  # dropout made the passes differ: U_mc > 0
    assert student.training and student.tuned.shared[0].training  # modes restored afterwards


def test_mc_passes_keep_batchnorm_in_eval_and_vary_only_through_dropout():
    torch.manual_seed(0)
    student = build_partial(PartialConfig(timm=TimmConfig(name="test_resnet", num_classes=10),
                                          tune_from_block=2)).train()  # fmt: skip
    stats = {k: v.clone() for k, v in student.tuned.state_dict().items() if "running" in k}
    feats = student.backbone_features(torch.rand(3, 3, 32, 32))
    mc = mc_head_logits(student, feats, passes=3)
    assert all(torch.equal(v, student.tuned.state_dict()[k]) for k, v in stats.items())
    assert not torch.equal(mc["clean"][0], mc["clean"][1])
    no_dropout = build_partial(PartialConfig(timm=TimmConfig(name="test_resnet", num_classes=10),
                                             tune_from_block=2, dropout=0.0))  # fmt: skip
    mc = mc_head_logits(no_dropout, no_dropout.backbone_features(torch.rand(3, 3, 32, 32)), passes=3)
    assert torch.equal(mc["clean"][0], mc["clean"][2])  # without dropout the passes are identical


def test_selection_tally_reports_f_correct():
    sel = select_heads(MC, rule="umc_kl")  # clean, unclean, unclean, clean
    y = torch.tensor([0, 1, 2, 1])
    entry = summarize(selection_tally(sel, y, key="clean", shifted=False) +
                      selection_tally(sel, y, key="imagenet-r", shifted=True))  # fmt: skip
    assert entry["f_correct"] == {"clean": 50.0, "imagenet-r": 50.0}
    assert entry["clean_acc"] == 100.0 * (sel.logits_BK.argmax(1) == y).float().mean().item()
