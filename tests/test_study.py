"""Multi-seed study: mean and sample sd per model, paired differences with their 95% t-interval, all
against hand computations; the markdown carries the numbers; the plots draw one error-bar series each."""

from __future__ import annotations

import json
import math

import pytest
from matplotlib.container import BarContainer, ErrorbarContainer
from PIL import Image

from robust.eval.corruptions import IMAGENET_C
from robust.eval.metrics import ALEXNET_ERROR
from robust.eval.study import difference, plot_study, study, study_figures, study_markdown, write_study

# t_{0.975, 2} in closed form: for 2 degrees of freedom the t quantile is (2p - 1) / sqrt(2 p (1 - p)).
T_975_DF2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # 4.302652729...
T_975_DF4 = 2.7764451  # t-table, 4 degrees of freedom, two-sided 95%


def _reports() -> dict[int, dict]:
    """Seeds 0, 1, 2 of ce and dad: dad - ce corrupted = 2, 3, 4; clean = 1, 0, -1."""
    ce = [(90.0, 60.0), (92.0, 61.0), (97.0, 62.0)]
    dad = [(91.0, 62.0), (92.0, 64.0), (96.0, 66.0)]
    return {
        seed: {"run": f"seed{seed}", "models": {
            "ce": {"clean_acc": ce[i][0], "corrupt_acc": ce[i][1], "sets": {"imagenet-r": 30.0}},
            "dad": {"clean_acc": dad[i][0], "corrupt_acc": dad[i][1], "sets": {"imagenet-r": 35.0 + i}},
        }}
        for i, seed in enumerate((0, 1, 2))
    }  # fmt: skip


def _pair(s: dict, a: str, b: str, metric: str) -> dict:
    (found,) = [p for p in s["pairs"] if (p["a"], p["b"], p["metric"]) == (a, b, metric)]
    return found


def test_t_interval_and_sample_sd_by_hand():
    assert T_975_DF2 == pytest.approx(4.302652729, abs=1e-9)
    s = study(_reports())
    assert s["seeds"] == [0, 1, 2]
    assert s["metrics"] == ["clean_acc", "sets/imagenet-r", "corrupt_acc", "avg_shifts"]  # nobody has mCE
    clean = s["models"]["ce"]["metrics"]["clean_acc"]
    # 90, 92, 97: mean 93, squared deviations 9 + 1 + 16 = 26, / (n - 1) = 13 (ddof=0 would be 26 / 3)
    assert clean["values"] == [90.0, 92.0, 97.0] and clean["n"] == 3
    assert clean["mean"] == pytest.approx(93.0) and clean["sd"] == pytest.approx(math.sqrt(13))
    # avg shifts of dad: (35 + 62) / 2, (36 + 64) / 2, (37 + 66) / 2 = 48.5, 50, 51.5
    assert s["models"]["dad"]["metrics"]["avg_shifts"]["values"] == pytest.approx([48.5, 50.0, 51.5])

    d = _pair(s, "dad", "ce", "corrupt_acc")
    assert d["values"] == pytest.approx([2.0, 3.0, 4.0])
    assert d["mean"] == pytest.approx(3.0) and d["sd"] == pytest.approx(1.0)
    half = T_975_DF2 * 1.0 / math.sqrt(3)  # 2.48413771...
    assert half == pytest.approx(2.4841377, abs=1e-7)
    assert d["ci95"] == pytest.approx([3.0 - half, 3.0 + half], abs=1e-9)
    assert d["all_positive"] and not d["all_negative"]

    c = _pair(s, "dad", "ce", "clean_acc")  # 1, 0, -1: mean 0, sd 1, mixed signs
    assert c["mean"] == pytest.approx(0.0) and c["sd"] == pytest.approx(1.0)
    assert c["ci95"] == pytest.approx([-half, half], abs=1e-9)
    assert not c["all_positive"] and not c["all_negative"]
    assert {(p["a"], p["b"]) for p in s["pairs"]} == {("dad", "ce")}


def test_five_seed_interval_against_the_t_table():
    d = difference([1.0, -1.0, 2.0, 0.0, 3.0])
    # mean 1; squared deviations 0 + 4 + 1 + 1 + 4 = 10, / 4 = 2.5
    assert d["mean"] == pytest.approx(1.0) and d["sd"] == pytest.approx(math.sqrt(2.5))
    half = T_975_DF4 * math.sqrt(2.5) / math.sqrt(5)  # 1.96324...
    assert d["ci95"] == pytest.approx([1.0 - half, 1.0 + half], abs=1e-6)
    assert not d["all_positive"] and not d["all_negative"]  # a zero is neither sign
    assert difference([-0.5, -0.1])["all_negative"]


def _full_table(error_scale: float) -> dict[str, list[float]]:
    # Errors = error_scale x AlexNet's, so the mCE is 100 * error_scale by construction.
    return {c: [100 * (1 - error_scale * ALEXNET_ERROR[c])] * 5 for c in IMAGENET_C}


def test_mce_over_seeds_and_default_pair_order():
    scales = {"ce": [0.8, 0.8, 0.8], "kd": [0.7, 0.7, 0.7], "dad": [0.5, 0.6, 0.7]}
    reports = {
        seed: {"models": {n: {"clean_acc": 99.0, "per_corruption": _full_table(scales[n][seed])} for n in scales}}
        for seed in range(3)
    }
    s = study(reports, metrics=["mce"])
    assert s["models"]["dad"]["metrics"]["mce"]["mean"] == pytest.approx(60.0)
    assert s["models"]["dad"]["metrics"]["mce"]["sd"] == pytest.approx(10.0)
    assert s["models"]["ce"]["metrics"]["mce"]["sd"] == pytest.approx(0.0)
    # each model minus every model before it, in report order
    assert [(p["a"], p["b"]) for p in s["pairs"]] == [("kd", "ce"), ("dad", "ce"), ("dad", "kd")]
    d = _pair(s, "dad", "ce", "mce")  # -30, -20, -10: lower mCE is better, so dad wins on every seed
    assert d["mean"] == pytest.approx(-20.0) and d["sd"] == pytest.approx(10.0)
    assert d["ci95"] == pytest.approx([-20.0 - T_975_DF2 * 10 / math.sqrt(3), -20.0 + T_975_DF2 * 10 / math.sqrt(3)])
    assert d["all_negative"] and not d["all_positive"]
    kd = _pair(s, "kd", "ce", "mce")  # -10 on every seed: sd 0, the interval is the point
    assert kd["sd"] == pytest.approx(0.0, abs=1e-9) and kd["ci95"] == pytest.approx([-10.0, -10.0])
    # caller-given pairs replace the default
    assert [(p["a"], p["b"]) for p in study(reports, metrics=["mce"], pairs=[("ce", "dad")])["pairs"]] == [("ce", "dad")]


def _corruption_reports() -> dict[int, dict]:
    """fog and snow at 5 severities; seed 1 is 4 points above seed 0 everywhere for a, 2 for b."""
    reports = {}
    for seed in (0, 1):
        fog = [70.0, 65.0, 60.0, 55.0, 50.0]  # mean 60
        snow = [80.0, 70.0, 60.0, 50.0, 40.0]  # mean 60
        models = {}
        for name, shift in (("a", 4.0 * seed), ("b", 2.0 * seed + 10)):
            table = {"fog": [v + shift for v in fog], "snow": [v + shift for v in snow]}
            models[name] = {"clean_acc": 80.0 + shift, "corrupt_acc": 60.0 + shift, "per_corruption": table}
        reports[seed] = {"models": models}
    return reports


def test_per_corruption_and_per_severity_stats():
    s = study(_corruption_reports())
    fog = s["models"]["a"]["per_corruption"]["fog"]
    assert fog["values"] == pytest.approx([60.0, 64.0])
    assert fog["mean"] == pytest.approx(62.0) and fog["sd"] == pytest.approx(math.sqrt(8))  # (2^2 + 2^2) / 1
    sev1 = s["models"]["b"]["per_severity"][0]  # (70 + 80) / 2 + 10, + 12
    assert sev1["values"] == pytest.approx([85.0, 87.0]) and sev1["sd"] == pytest.approx(math.sqrt(2))
    assert len(s["models"]["b"]["per_severity"]) == 5
    md = study_markdown(s)
    assert "| Model | fog | snow |" in md
    assert "| a | 62.00 ± 2.83 | 62.00 ± 2.83 |" in md
    assert "| b | 71.00 ± 1.41 | 71.00 ± 1.41 |" in md


def test_markdown_carries_means_sds_and_intervals():
    md = study_markdown(study(_reports()))
    assert "## Over 3 seeds (0, 1, 2): mean ± sd (%)" in md
    assert "| Model | Clean | imagenet-r | Corrupted (mean) | Avg shifts |" in md
    assert "| ce | 93.00 ± 3.61 | 30.00 ± 0.00 | 61.00 ± 1.00 | 45.50 ± 0.50 |" in md
    # 3 -+ 2.4841 -> [0.52, 5.48]
    assert "| dad - ce | Corrupted (mean) | 3.00 | [0.52, 5.48] | all > 0 | 2.00, 3.00, 4.00 |" in md
    assert "| dad - ce | Clean | 0.00 | [-2.48, 2.48] | mixed | 1.00, 0.00, -1.00 |" in md


def test_one_seed_has_no_sd_or_interval(tmp_path):
    s = study({7: _reports()[0]})
    clean = s["models"]["ce"]["metrics"]["clean_acc"]
    assert clean == {"mean": 90.0, "sd": None, "n": 1, "values": [90.0]}
    d = _pair(s, "dad", "ce", "corrupt_acc")
    assert d["sd"] is None and d["ci95"] is None and d["all_positive"]
    md = study_markdown(s)
    assert "| ce | 90.00 | 30.00 | 60.00 | 45.00 |" in md
    assert "| dad - ce | Corrupted (mean) | 2.00 | - | all > 0 | 2.00 |" in md
    assert set(plot_study(s, tmp_path)) == {"differences"}  # no corruption tables: no severity or bar plots


def test_inconsistent_reports_are_value_errors():
    reports = _reports()
    del reports[1]["models"]["dad"]
    with pytest.raises(ValueError, match=r"seed 1 has no model \['dad'\]"):
        study(reports)
    reports = _reports()
    del reports[2]["models"]["ce"]["sets"]
    with pytest.raises(ValueError, match=r"'ce' has 'sets/imagenet-r' on some seeds but not on seeds \[2\]"):
        study(reports)
    with pytest.raises(ValueError, match="no model has the metrics \\['mce'\\]"):
        study(_reports(), metrics=["clean_acc", "mce"])
    with pytest.raises(ValueError, match="pairs name models \\['kd'\\]"):
        study(_reports(), pairs=[("kd", "ce")])
    with pytest.raises(ValueError, match="at least one report"):
        study({})


def _bar_halves(container: ErrorbarContainer) -> list[float]:
    (lines,) = container.lines[2]
    return [(seg[1][1] - seg[0][1]) / 2 for seg in lines.get_segments()]


def test_figures_draw_one_error_bar_series_per_model_and_metric():
    s = study(_corruption_reports())
    figs = study_figures(s)
    assert set(figs) == {"severity", "corruptions", "differences"}
    (ax,) = figs["severity"].axes
    series = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(series) == 2  # models a and b
    ys = series[0].lines[0].get_ydata()  # a: clean 80, 84; severity 1: 75, 79
    assert list(ys[:2]) == pytest.approx([82.0, 77.0])
    assert _bar_halves(series[0])[:2] == pytest.approx([math.sqrt(8)] * 2)  # +- sd of (80, 84) and (75, 79)

    (ax,) = figs["corruptions"].axes
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars) == 2 and all(b.errorbar is not None for b in bars)
    assert [p.get_height() for p in bars[1]] == pytest.approx([71.0, 71.0])
    assert _bar_halves(bars[1].errorbar) == pytest.approx([math.sqrt(2)] * 2)

    (ax,) = figs["differences"].axes
    series = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    # clean, corrupted and avg shifts (= corrupted without sets); one point per pair (b - a) in each
    assert len(series) == len(s["metrics"]) == 3
    # b - a: 10, 8 on every metric -> mean 9, sd sqrt(2), half-width t_{0.975,1} sqrt(2) / sqrt(2) = 12.706
    for container in series:
        assert list(container.lines[0].get_ydata()) == pytest.approx([9.0])
        assert _bar_halves(container) == pytest.approx([12.7062047], abs=1e-6)
    assert any(list(line.get_ydata()) == [0.0, 0.0] for line in ax.get_lines())  # the zero line


def test_write_study_files(tmp_path):
    files = write_study(_corruption_reports(), tmp_path / "out")
    s = json.loads(files.json.read_text())
    assert s == study(_corruption_reports())
    assert files.markdown.read_text().startswith("# Multi-seed study\n\n## Over 2 seeds (0, 1)")
    assert {p.name for p in files.plots.values()} == {"study_severity.png", "study_corruptions.png",
                                                      "study_differences.png"}  # fmt: skip
    for path in files.plots.values():
        with Image.open(path) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100
