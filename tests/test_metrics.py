"""Metrics and per-batch evaluation against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from robust.eval.corruptions import IMAGENET_C, _REGISTRY, corrupt
from robust.eval.evaluate import evaluate_batch, evaluate_corrupted, evaluate_sequences, evaluate_x_c, project_logits
from robust.eval.metrics import (
    ALEXNET_CLEAN_ERROR,
    ALEXNET_ERROR,
    Tally,
    classification_tally,
    corruption_errors,
    flip_tally,
    mean_corruption_error,
    mean_flip_rate,
    routing_tally,
    summarize,
    tally_from_columns,
    tally_to_columns,
)

torch.manual_seed(0)


def test_top1_top5_counts_by_hand():
    logits = torch.tensor([
        [9.0, 8, 7, 6, 5, 4, 0],  # y=0: top-1 right
        [9.0, 8, 7, 6, 5, 4, 0],  # y=4: 5th best -> top-5 only
        [9.0, 8, 7, 6, 5, 4, 0],  # y=6: worst -> neither
        [0.0, 1, 0, 0, 0, 0, 0],  # y=1: top-1 right
    ])  # fmt: skip
    tally = classification_tally(logits, torch.tensor([0, 4, 6, 1]), key="clean")
    assert tally.accuracy("clean") == 2 / 4
    assert tally.accuracy("clean", k=5) == 3 / 4


def _two_class_logits(confidences: list[float], correct: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    # softmax([log p, log(1 - p)]) = [p, 1 - p]: the confidence is p and the prediction is class 0.
    p = torch.tensor(confidences, dtype=torch.float64)
    logits = torch.stack([p.log(), (1 - p).log()], dim=1)
    y = torch.tensor([0 if c else 1 for c in correct])
    return logits, y


def test_ece_by_hand():
    logits, y = _two_class_logits([0.9, 0.9, 0.62, 0.55], [True, False, True, False])
    # bins of width 1/15: {0.9, 0.9} acc 0.5 conf 0.9; {0.62} acc 1; {0.55} acc 0; each weighted by n_b / 4
    expected = 2 / 4 * abs(0.5 - 0.9) + 1 / 4 * abs(1 - 0.62) + 1 / 4 * abs(0 - 0.55)
    assert classification_tally(logits, y).ece("clean") == pytest.approx(expected, abs=1e-12)


def test_ece_matches_a_direct_implementation():
    logits, y = torch.randn(500, 10) * 3, torch.randint(0, 10, (500,))
    conf, pred = logits.softmax(1).max(1)
    conf, correct = conf.double().numpy(), (pred == y).numpy()
    bins = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
    ref = sum(abs(correct[bins == b].sum() - conf[bins == b].sum()) for b in range(15)) / len(y)
    assert classification_tally(logits, y).ece("clean") == pytest.approx(ref, abs=1e-6)


def test_tallies_from_two_workers_add_up_to_one_pass():
    logits, y = torch.randn(64, 10), torch.randint(0, 10, (64,))
    chose_clean = torch.rand(64) > 0.5
    one = classification_tally(logits, y) + routing_tally(chose_clean, key="clean", shifted=False)
    halves = [
        classification_tally(logits[s], y[s]) + routing_tally(chose_clean[s], key="clean", shifted=False)
        for s in (slice(0, 40), slice(40, 64))
    ]
    both = sum(halves, Tally())
    assert both.stats.keys() == one.stats.keys()
    for name, value in one.stats["clean"].items():
        torch.testing.assert_close(both.stats["clean"][name], value)
    assert both.ece("clean") == pytest.approx(one.ece("clean"))
    assert both.f_correct("clean") == one.f_correct("clean")


def test_f_correct_by_hand():
    tally = routing_tally(torch.tensor([True, True, False, True]), key="clean", shifted=False)
    tally = tally + routing_tally(torch.tensor([False, False, True]), key="imagenet-r", shifted=True)
    assert tally.f_correct("clean") == 3 / 4  # the clean head is right in distribution
    assert tally.f_correct("imagenet-r") == 2 / 3  # the unclean head is right under shift
    assert summarize(tally)["f_correct_overall"] == pytest.approx(100 * 5 / 7)  # pooled over both sets


def test_flip_probability_noise_vs_consecutive():
    preds = torch.tensor([[0, 1, 0, 0]])
    # noise: every frame against the first -> (1, 0, 0); others: consecutive -> (0->1, 1->0, 0->0)
    assert flip_tally(preds, perturbation="gaussian_noise").flip_probability(("flip", "gaussian_noise")) == 1 / 3
    assert flip_tally(preds, perturbation="rotate").flip_probability(("flip", "rotate")) == 2 / 3
    # step 2: frames (0, 2) and (1, 3) -> (0 vs 0, 1 vs 0)
    assert flip_tally(preds, perturbation="rotate", step=2).flip_probability(("flip", "rotate")) == 1 / 2
    assert mean_flip_rate({"a": 0.2, "b": 0.4}) == pytest.approx(0.3)
    assert mean_flip_rate({"a": 0.2, "b": 0.4}, alexnet={"a": 0.4, "b": 0.4}) == pytest.approx(0.75)


def test_ce_and_relative_ce_by_hand():
    errors = {"gaussian_noise": [0.5, 0.6, 0.7, 0.8, 0.9], "brightness": [0.3] * 5}
    ce = corruption_errors(errors)
    assert ce["gaussian_noise"] == pytest.approx(3.5 / (5 * 0.886428))
    assert ce["brightness"] == pytest.approx(1.5 / (5 * 0.564592))
    rel = corruption_errors(errors, clean_error=0.2)
    assert rel["gaussian_noise"] == pytest.approx((3.5 - 5 * 0.2) / (5 * (0.886428 - 0.4348)))
    assert rel["brightness"] == pytest.approx((1.5 - 5 * 0.2) / (5 * (0.564592 - 0.4348)))


def test_mce_is_one_for_alexnet_errors_and_needs_all_fifteen():
    alexnet = {c: [ALEXNET_ERROR[c]] * 5 for c in IMAGENET_C}
    assert mean_corruption_error(alexnet) == pytest.approx(1.0)
    assert mean_corruption_error(alexnet, clean_error=ALEXNET_CLEAN_ERROR) == pytest.approx(1.0)
    halved = {c: [e / 2 for e in v] for c, v in alexnet.items()}
    assert mean_corruption_error(halved) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="fog"):
        mean_corruption_error({c: v for c, v in alexnet.items() if c != "fog"})
    with pytest.raises(ValueError, match="5 severities"):
        corruption_errors({"fog": [0.5, 0.5]})


def test_summarize_gives_percent_and_mce():
    tally = Tally()
    logits = torch.eye(4)  # predicts 0, 1, 2, 3
    for c in IMAGENET_C:
        for s in range(1, 6):
            tally = tally + classification_tally(logits, torch.tensor([0, 1, 2, 0]), key=(c, s))  # 75 %
    tally = tally + classification_tally(logits, torch.arange(4), key="clean")  # 100 %
    tally = tally + classification_tally(logits, torch.tensor([0, 0, 0, 0]), key="imagenet-r")  # 25 %
    entry = summarize(tally)
    assert entry["clean_acc"] == 100.0 and entry["corrupt_acc"] == 75.0
    assert entry["sets"] == {"imagenet-r": 25.0}
    assert list(entry["per_corruption"]) == list(IMAGENET_C) and entry["per_corruption"]["fog"] == [75.0] * 5
    expected = 100 * np.mean([0.25 / ALEXNET_ERROR[c] for c in IMAGENET_C])
    assert entry["mce"] == pytest.approx(expected)
    expected_rel = 100 * np.mean([0.25 / (ALEXNET_ERROR[c] - ALEXNET_CLEAN_ERROR) for c in IMAGENET_C])
    assert entry["relative_mce"] == pytest.approx(expected_rel)


def test_project_logits_takes_the_max_over_each_group():
    logits = torch.tensor([[0.0, 5, 1, 7, 2], [3.0, 0, 4, 1, 9]])
    out = project_logits(logits, ((3,), (1, 4), (0, 2, 4)))
    torch.testing.assert_close(out, torch.tensor([[7.0, 5, 2], [1.0, 9, 9]]))


def _channel_model(x_BCHW: torch.Tensor) -> torch.Tensor:
    return x_BCHW.mean(dim=(2, 3)) * 10  # predicts the brightest channel


def test_evaluate_batch_with_class_groups():
    x = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    x[0, 0], x[1, 2], x[2, 1] = 255, 255, 255  # red, blue, green
    # groups: subset class 0 <- channel 2, subset class 1 <- channels 0 or 1
    tally = evaluate_batch(_channel_model, x, torch.tensor([1, 0, 0]), key="sub", shifted=True, groups=((2,), (0, 1)))
    assert tally.accuracy("sub") == 2 / 3


def test_evaluate_corrupted_splits_by_key():
    x = torch.zeros(4, 3, 2, 2)
    x[:, 0] = 1  # all predict class 0
    tally = evaluate_corrupted(_channel_model, x, torch.tensor([0, 1, 0, 0]), ["fog", "fog", "snow", "fog"],
                               torch.tensor([1, 1, 2, 3]))  # fmt: skip
    assert tally.accuracy(("fog", 1)) == 0.5 and tally.accuracy(("snow", 2)) == 1.0
    assert float(tally.stats[("fog", 3)]["n"]) == 1


def test_evaluate_sequences_counts_flips():
    frames = torch.zeros(2, 3, 3, 2, 2)
    frames[0, :, 0] = 1  # video 0: red, red, red -> no flips
    frames[1, 0, 0], frames[1, 1, 1], frames[1, 2, 0] = 1, 1, 1  # video 1: red, green, red
    tally = evaluate_sequences(_channel_model, frames, ["rotate", "rotate"])
    assert tally.flip_probability(("flip", "rotate")) == 2 / 4
    tally = evaluate_sequences(_channel_model, frames, ["rotate", "shot_noise"])
    assert tally.flip_probability(("flip", "shot_noise")) == 1 / 2  # (green vs red, red vs red)


@pytest.mark.skipif("brightness" not in _REGISTRY, reason="brightness corruption not registered yet")
def test_evaluate_x_c_scores_the_corrupted_batch():
    x, y = torch.rand(6, 3, 16, 16), torch.randint(0, 3, (6,))
    tally = evaluate_x_c(_channel_model, x, y, corruptions=["brightness"], severities=[2, 5])
    for s in (2, 5):
        direct = evaluate_batch(_channel_model, corrupt(x, "brightness", s), y, key=("brightness", s), shifted=True)
        assert math.isclose(tally.accuracy(("brightness", s)), direct.accuracy(("brightness", s)))


def test_tally_columns_are_arrow_native_and_round_trip_exactly():
    logits, y = torch.randn(20, 10, dtype=torch.float64), torch.randint(0, 10, (20,))
    tally = (classification_tally(logits, y, key="clean") + routing_tally(logits[:, 0] > 0, key="clean", shifted=False)
             + classification_tally(logits[:7], y[:7], key=("fog", 3))
             + flip_tally(torch.tensor([[0, 1, 1], [2, 2, 0]]), perturbation="rotate"))  # fmt: skip
    columns = tally_to_columns(tally)
    # one row per element: 5 scalar sums + 3 x 15 ECE bins for "clean", 3 + 45 for ("fog", 3), 2 flip sums
    assert len(columns["value"]) == (5 + 45) + (3 + 45) + 2
    table = pa.table(columns)  # what Ray Data makes of an actor's batch: no pickled objects
    assert [str(t) for t in table.schema.types] == ["string", "string", "int64", "double"]
    order = np.random.default_rng(0).permutation(table.num_rows)  # rows may come back in any order
    back = tally_from_columns({k: table.column(k).to_numpy()[order] for k in table.column_names})
    assert back.stats.keys() == tally.stats.keys() == {"clean", ("fog", 3), ("flip", "rotate")}
    for key, named in tally.stats.items():
        assert back.stats[key].keys() == named.keys()
        for name, value in named.items():
            got = back.stats[key][name]
            assert got.dtype == value.dtype == torch.float64 and got.shape == value.shape, (key, name)
            assert torch.equal(got, value), (key, name)
    assert tally_from_columns(tally_to_columns(Tally())).stats == {}
