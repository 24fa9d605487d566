"""Report files: JSON round trip, markdown tables with hand-checked mCE, valid PNG plots with their series;
model entries built from per-set tallies."""

from __future__ import annotations

import json
import math
from statistics import fmean

import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from robust.eval.corruptions import IMAGENET_C
from robust.eval.metrics import ALEXNET_ERROR, Tally, classification_tally, flip_tally
from robust.eval.report import _cost_plot, cost_fields, model_entry, set_entry, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _per_corruption(error_scale: float) -> dict[str, list[float]]:
    # Errors = error_scale x AlexNet's, so the mCE is 100 * error_scale by construction.
    return {c: [100 * (1 - error_scale * ALEXNET_ERROR[c])] * 5 for c in IMAGENET_C}


def _report() -> dict:
    return {
        "run": "test",
        "models": {
            "alexnet-like": {"clean_acc": 56.5, "corrupt_acc": 20.0, "per_corruption": _per_corruption(1.0),
                             "sets": {"imagenet-r": 20.0}, "weights": "a.safetensors",
                             "startup_s": 30.0, "train_s": 100.0, "train_samples": 50_000},
            "dad": {"clean_acc": 80.0, "corrupt_acc": 50.0, "per_corruption": _per_corruption(0.5),
                    "sets": {"imagenet-r": 40.0, "sketch": 30.0}, "weights": "d.safetensors",
                    "startup_s": 45.0, "train_s": 400.0, "train_samples": 100_000},
            "clean-only": {"clean_acc": 75.0, "sets": {"sketch": 25.0}, "weights": "c.safetensors"},
        },
    }  # fmt: skip


def test_report_files_tables_and_plots(tmp_path):
    files = write_report(_report(), tmp_path)
    derived = {"alexnet-like": {"samples_per_s": 500.0, "train_ms_per_sample": 2.0},  # 50k samples in 100 s
               "dad": {"samples_per_s": 250.0, "train_ms_per_sample": 4.0}}  # fmt: skip
    expected = _report()
    for name, fields in derived.items():
        expected["models"][name].update(fields)
    assert json.loads(files.json.read_text()) == expected
    md = files.markdown.read_text()
    assert "| Model | Clean | imagenet-r | sketch | Corrupted (mean) | mCE | Avg shifts |" in md
    assert "| alexnet-like | 56.50 | 20.00 | - | 20.00 | 100.00 | 20.00 |" in md
    assert "| dad | 80.00 | 40.00 | 30.00 | 50.00 | 50.00 | 40.00 |" in md  # avg of 40, 30 and 50
    assert "| clean-only | 75.00 | - | 25.00 | - | - | 25.00 |" in md
    assert "| Model | startup_s | train_s | train_samples | samples_per_s | train_ms_per_sample | weights |" in md
    assert "| dad | 45.00 | 400.00 | 100000 | 250.00 | 4.00 | d.safetensors |" in md  # start-up apart from training
    assert set(files.plots) == {"severity", "corruptions", "cost"}
    # two models have corruption results and two have training costs; "clean-only" draws nothing
    assert files.series == {"severity": 2, "corruptions": 2, "cost": 2}
    for path in files.plots.values():
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100


def test_cost_plot_puts_training_cost_per_sample_against_corrupted_accuracy():
    fig = Figure()
    models = {n: {**e, **cost_fields(e)} for n, e in _report()["models"].items()}
    ax = fig.add_subplot()
    assert _cost_plot(ax, models) == 2
    points = [c.get_offsets().tolist() for c in ax.collections]
    assert points == [[[2.0, 20.0]], [[4.0, 50.0]]] and ax.get_xlabel() == "training cost (ms / sample)"
    assert cost_fields({"train_s": 10.0}) == {}  # no sample count: nothing to derive
    with pytest.raises(ValueError, match="positive"):
        cost_fields({"train_s": 0.0, "train_samples": 10})


def test_report_without_corruptions_or_costs_draws_no_plots(tmp_path):
    files = write_report({"models": {"m": {"clean_acc": 70.0, "sets": {"v2": 60.0}}}}, tmp_path)
    assert files.plots == {} and files.series == {}
    assert "| m | 70.00 | 60.00 | - | - | 60.00 |" in files.markdown.read_text()


def test_partial_corruptions_give_no_mce(tmp_path):
    entry = {"clean_acc": 90.0, "corrupt_acc": 60.0, "per_corruption": {"fog": [70, 65, 60, 55, 50]}}
    files = write_report({"models": {"m": entry}}, tmp_path)
    md = files.markdown.read_text()
    assert "| m | 90.00 | 60.00 | - | 60.00 |" in md
    assert "| m | 90.00 | 70.00 | 65.00 | 60.00 | 55.00 | 50.00 |" in md  # per-severity table
    assert files.series == {"severity": 1, "corruptions": 1}


def test_bad_reports_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="models"):
        write_report({"run": 1}, tmp_path)
    with pytest.raises(ValueError, match="clean_acc"):
        write_report({"models": {"m": {"sets": {}}}}, tmp_path)


def _tally(key, n: int, correct: int) -> Tally:
    """n samples of class 0, the first ``correct`` predicted right, the rest as class 1 (class 0 last)."""
    logits_BK = torch.zeros(n, 10)
    logits_BK[:correct, 0] = 9.0
    logits_BK[correct:, 1] = 9.0
    logits_BK[correct:, 0] = -9.0
    return classification_tally(logits_BK, torch.zeros(n, dtype=torch.long), key=key)


def _stored_c(n: int = 100) -> tuple[Tally, float]:
    """ImageNet-C counts with about half AlexNet's error at every severity, and their mCE by hand (percent)."""
    correct = {c: round(n * (1 - 0.5 * ALEXNET_ERROR[c])) for c in IMAGENET_C}
    tally = sum((_tally((c, s), n, correct[c]) for c in IMAGENET_C for s in range(1, 6)), Tally())
    # CE_c = sum_s E_sc / sum_s E^AlexNet_c = E_c / E^AlexNet_c here (equal severities); mCE = mean over c
    return tally, 100 * fmean((1 - correct[c] / n) / ALEXNET_ERROR[c] for c in IMAGENET_C)


def test_model_entry_takes_corruptions_from_stored_imagenet_c_and_makes_other_views_columns():
    stored_c, mce = _stored_c()
    per_set = {
        "clean": _tally("clean", 10, 8) + _tally(("fog", 1), 10, 5),  # X-C of the clean set
        "r": _tally("r", 4, 1),
        "in-c": stored_c,
        "p": flip_tally(torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2]]), perturbation="rotate"),  # 1 flip in 6 pairs
    }
    entry = model_entry(per_set, clean="clean")
    assert entry["clean_acc"] == 80.0 and entry["mce"] == pytest.approx(mce, rel=1e-12) and 49 < mce < 51
    assert set(entry["per_corruption"]) == set(IMAGENET_C)  # from the stored ImageNet-C set, not the clean X-C
    assert entry["sets"] == {"r": 25.0, "clean-C": 50.0}
    assert entry["flip_prob"] == {"rotate": pytest.approx(100 / 6)}
    assert entry["mfr_unnormalised"] == entry["flip_prob"]["rotate"]  # one perturbation: the mean is its FP
    stored = set_entry(per_set["in-c"], "in-c")
    assert "acc" not in stored and stored["mce"] == pytest.approx(mce, rel=1e-12)  # mCE needs no clean accuracy
    # one bin holds all 4: ECE = |accuracy - mean confidence|, softmax of a 9 against zeros (and a -9)
    conf_right, conf_wrong = math.exp(9) / (math.exp(9) + 9), math.exp(9) / (math.exp(9) + 8 + math.exp(-9))
    ece = 100 * abs(0.25 - (conf_right + 3 * conf_wrong) / 4)
    assert set_entry(per_set["r"], "r", n=4) == {"n": 4, "acc": 25.0, "top5": 25.0, "ece": pytest.approx(ece)}
    # without a stored ImageNet-C, the clean set's X-C is the report's corrupted accuracy
    entry = model_entry({k: v for k, v in per_set.items() if k != "in-c"}, clean="clean")
    assert entry["per_corruption"] == {"fog": [50.0, None, None, None, None]} and entry["sets"] == {"r": 25.0}
    with pytest.raises(ValueError, match="labelled"):
        model_entry({"in-c": per_set["in-c"]}, clean="in-c")


def test_markdown_lists_flip_probabilities_and_keeps_per_set_out_of_the_header(tmp_path):
    entry = {"clean_acc": 70.0, "flip_prob": {"rotate": 10.0, "gaussian_noise": 20.0}, "mfr_unnormalised": 15.0}
    files = write_report({"models": {"m": entry}, "per_set": {"m": {"clean": {"acc": 70.0}}}, "run": "x"}, tmp_path)
    md = files.markdown.read_text()
    assert "| Model | rotate | gaussian_noise | mFR (unnormalised) |" in md
    assert "| m | 10.00 | 20.00 | 15.00 |" in md
    assert "- run: x" in md and "per_set" not in md
