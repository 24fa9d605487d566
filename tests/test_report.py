"""Report files: JSON round trip, markdown tables with hand-checked mCE, valid PNG plots with their series."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from robust.eval.corruptions import IMAGENET_C
from robust.eval.metrics import ALEXNET_ERROR
from robust.eval.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _per_corruption(error_scale: float) -> dict[str, list[float]]:
    # Errors = error_scale x AlexNet's, so the mCE is 100 * error_scale by construction.
    return {c: [100 * (1 - error_scale * ALEXNET_ERROR[c])] * 5 for c in IMAGENET_C}


def _report() -> dict:
    return {
        "run": "test",
        "models": {
            "alexnet-like": {"clean_acc": 56.5, "corrupt_acc": 20.0, "per_corruption": _per_corruption(1.0),
                             "sets": {"imagenet-r": 20.0}, "weights": "a.safetensors", "train_cost_s": 100.0},
            "dad": {"clean_acc": 80.0, "corrupt_acc": 50.0, "per_corruption": _per_corruption(0.5),
                    "sets": {"imagenet-r": 40.0, "sketch": 30.0}, "weights": "d.safetensors", "train_cost_s": 400.0},
            "clean-only": {"clean_acc": 75.0, "sets": {"sketch": 25.0}, "weights": "c.safetensors"},
        },
    }  # fmt: skip


def test_report_files_tables_and_plots(tmp_path):
    files = write_report(_report(), tmp_path)
    assert json.loads(files.json.read_text()) == _report()
    md = files.markdown.read_text()
    assert "| Model | Clean | imagenet-r | sketch | Corrupted (mean) | mCE | Avg shifts |" in md
    assert "| alexnet-like | 56.50 | 20.00 | - | 20.00 | 100.00 | 20.00 |" in md
    assert "| dad | 80.00 | 40.00 | 30.00 | 50.00 | 50.00 | 40.00 |" in md  # avg of 40, 30 and 50
    assert "| clean-only | 75.00 | - | 25.00 | - | - | 25.00 |" in md
    assert set(files.plots) == {"severity", "corruptions", "cost"}
    # two models have corruption results and two have training costs; "clean-only" draws nothing
    assert files.series == {"severity": 2, "corruptions": 2, "cost": 2}
    for path in files.plots.values():
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100


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
