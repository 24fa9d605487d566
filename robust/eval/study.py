"""Multi-seed studies: one report per seed (the same models trained through the same pools) in, the mean
and spread over seeds per model and the paired difference between methods with its 95% t-interval out.

Seeds pair the runs: seed s of every method shares its data order and initialisation draws, so a
difference is computed per seed first and the interval is over those differences (a paired t-interval,
mean +- t_{0.975, n-1} * sd / sqrt(n)). With one seed there is no spread: sd and the interval are None.

A study dict (JSON as written to study.json)::

    {"seeds": [0, 1, 2],
     "metrics": ["clean_acc", "sets/imagenet-r", "corrupt_acc", "mce", "avg_shifts"],
     "models": {name: {"metrics": {metric: stat},            # the metrics this model has
                       "per_corruption": {corruption: stat},  # each seed's mean over severities
                       "per_severity": [stat] * 5}},          # each seed's mean over corruptions
     "pairs": [{"a": "dad", "b": "ce", "metric": "corrupt_acc", **stat, "ci95": [lo, hi] | None,
                "all_positive": bool, "all_negative": bool}]}  # stat of a - b per seed

where a stat is ``{"mean", "sd" (ddof=1, None for one seed), "n", "values" (per seed, in "seeds" order)}``.
Metrics are entry fields ("clean_acc", "corrupt_acc", "f_correct_overall", ...), "sets/<name>" for a
shifted set, and "mce" / "avg_shifts" computed from the entry as report.md computes them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean, stdev
from typing import TYPE_CHECKING, Any

import numpy as np

from robust.eval.metrics import SEVERITIES
from robust.eval.report import avg_shifts, mce_of, new_figure

if TYPE_CHECKING:  # matplotlib loads in ~0.5 s: only the processes that plot import it
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CONFIDENCE = 0.95
HEADERS = {"clean_acc": "Clean", "corrupt_acc": "Corrupted (mean)", "mce": "mCE", "avg_shifts": "Avg shifts",
           "f_correct_overall": "F_correct"}  # fmt: skip
SET_PREFIX = "sets/"


@dataclass
class StudyFiles:
    json: Path
    markdown: Path
    plots: dict[str, Path]  # plot name -> PNG


def study(
    reports: Mapping[int, Mapping[str, Any]],
    *,
    metrics: Sequence[str] | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """The study of one report per seed (``{seed: report}``, every report with the same models).

    ``metrics`` defaults to clean accuracy, every shifted set, corrupted accuracy, mCE, avg shifts and
    F_correct, keeping those some model has. ``pairs`` of (a, b) give the differences a - b; by default
    each model minus every model listed before it (models in the first report's order: ce, kd, dad gives
    kd - ce, dad - ce, dad - kd). A pair is left out for a metric that either model lacks.
    """
    seeds = list(reports)
    if not seeds:
        raise ValueError("a study needs at least one report: pass {seed: report}")
    models = _check_models(reports)
    names = list(metrics) if metrics is not None else _default_metrics(reports)
    per_model = {name: _model(name, [reports[s]["models"][name] for s in seeds], seeds, names) for name in models}
    kept = [m for m in names if any(m in entry["metrics"] for entry in per_model.values())]
    if metrics is not None and len(kept) < len(names):
        missing = [m for m in names if m not in kept]
        raise ValueError(f"no model has the metrics {missing}; name entry fields, 'sets/<name>', 'mce' or 'avg_shifts'")
    return {"seeds": seeds, "metrics": kept, "models": per_model, "pairs": _pairs(per_model, kept, pairs, models)}


def _model(name: str, entries: list[Mapping[str, Any]], seeds: list[int], metrics: list[str]) -> dict[str, Any]:
    """One model's stats over seeds (``entries`` in ``seeds`` order)."""
    found = {m: _stat(v) for m in metrics if (v := _values(name, m, seeds, [_metric(e, m) for e in entries]))}
    tables = [e.get("per_corruption", {}) for e in entries]
    per_corruption = {}
    for c in dict.fromkeys(c for table in tables for c in table):
        if values := _values(name, c, seeds, [_mean(table.get(c)) for table in tables]):
            per_corruption[c] = _stat(values)
    out: dict[str, Any] = {"metrics": found, "per_corruption": per_corruption}
    if per_corruption:  # None where no corruption has that severity
        by_severity = [_values(name, f"severity {s}", seeds, [_by_severity(t, s) for t in tables]) for s in SEVERITIES]
        out["per_severity"] = [v and _stat(v) for v in by_severity]
    return out


def _check_models(reports: Mapping[int, Mapping[str, Any]]) -> list[str]:
    for seed, report in reports.items():
        if not isinstance(report.get("models"), Mapping) or not report["models"]:
            raise ValueError(f"the report of seed {seed} needs a non-empty 'models' mapping; see robust.eval.report")
    models = list(dict.fromkeys(n for r in reports.values() for n in r["models"]))
    for seed, report in reports.items():
        missing = [n for n in models if n not in report["models"]]
        if missing:
            raise ValueError(f"the report of seed {seed} has no model {missing}; every seed must train every model")
    return models


def _default_metrics(reports: Mapping[int, Mapping[str, Any]]) -> list[str]:
    entries = [e for r in reports.values() for e in r["models"].values()]
    sets = list(dict.fromkeys(f"{SET_PREFIX}{s}" for e in entries for s in e.get("sets", {})))
    return ["clean_acc", *sets, "corrupt_acc", "mce", "avg_shifts", "f_correct_overall"]


def _metric(entry: Mapping[str, Any], metric: str) -> float | None:
    if metric == "mce":
        return mce_of(entry)
    if metric == "avg_shifts":
        return avg_shifts(entry)
    if metric.startswith(SET_PREFIX):
        return entry.get("sets", {}).get(metric[len(SET_PREFIX) :])
    return entry.get(metric)


def _values(model: str, what: str, seeds: list[int], values: list[float | None]) -> list[float] | None:
    """The per-seed values, or None when no seed has one; some seeds without one is an error."""
    lacking = [s for s, v in zip(seeds, values) if v is None]
    if len(lacking) == len(seeds):
        return None
    if lacking:
        raise ValueError(f"model {model!r} has {what!r} on some seeds but not on seeds {lacking}; "
                         "evaluate every seed's run on the same sets")  # fmt: skip
    return [float(v) for v in values]


def _stat(values: list[float]) -> dict[str, Any]:
    return {"mean": fmean(values), "sd": stdev(values) if len(values) > 1 else None, "n": len(values),
            "values": values}  # fmt: skip


def _mean(values: Sequence[float | None] | None) -> float | None:
    present = [v for v in values or [] if v is not None]
    return fmean(present) if present else None


def _by_severity(table: Mapping[str, Sequence[float | None]], severity: int) -> float | None:
    return _mean([accs[severity - 1] for accs in table.values()])


def difference(values: Sequence[float]) -> dict[str, Any]:
    """Stat of per-seed differences with the paired t-interval mean +- t_{0.975, n-1} * sd / sqrt(n)
    ("ci95", None for one seed) and whether every seed's difference is > 0 or < 0."""
    out = _stat([float(v) for v in values])
    if out["sd"] is None:
        out["ci95"] = None
    else:
        from scipy.stats import t as student_t  # scipy.stats loads in ~1 s: only here

        half = float(student_t.ppf(0.5 + CONFIDENCE / 2, out["n"] - 1)) * out["sd"] / math.sqrt(out["n"])
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    out["all_positive"] = all(v > 0 for v in values)
    out["all_negative"] = all(v < 0 for v in values)
    return out


def _pairs(
    per_model: Mapping[str, Any], metrics: list[str], pairs: Sequence[tuple[str, str]] | None, models: list[str]
) -> list[dict[str, Any]]:
    if pairs is None:
        pairs = [(a, b) for j, a in enumerate(models) for b in models[:j]]
    unknown = sorted({n for pair in pairs for n in pair} - set(models))
    if unknown:
        raise ValueError(f"pairs name models {unknown} that the reports do not have; they have {models}")
    out = []
    for a, b in pairs:
        for m in metrics:
            if m in per_model[a]["metrics"] and m in per_model[b]["metrics"]:
                va, vb = per_model[a]["metrics"][m]["values"], per_model[b]["metrics"][m]["values"]
                out.append({"a": a, "b": b, "metric": m, **difference([x - y for x, y in zip(va, vb)])})
    return out


def study_markdown(s: Mapping[str, Any]) -> str:
    """report.md sections: models (mean +- sd), accuracy per corruption, paired differences with CIs."""
    seeds = ", ".join(map(str, s["seeds"]))
    lines = [f"## Over {len(s['seeds'])} seeds ({seeds}): mean ± sd (%)", ""]
    rows = [[n, *[e["metrics"].get(m) for m in s["metrics"]]] for n, e in s["models"].items()]
    lines += _table(["Model", *map(_header, s["metrics"])], rows)
    corruptions = list(dict.fromkeys(c for e in s["models"].values() for c in e["per_corruption"]))
    if corruptions:
        lines += ["", "## Accuracy per corruption (%), mean over severities, mean ± sd over seeds", ""]
        rows = [[n, *[e["per_corruption"].get(c) for c in corruptions]] for n, e in s["models"].items()]
        lines += _table(["Model", *corruptions], rows)
    if s["pairs"]:
        lines += ["", f"## Paired differences over seeds, {CONFIDENCE:.0%} t-interval (percentage points)", ""]
        rows = [[f"{p['a']} - {p['b']}", _header(p["metric"]), f"{p['mean']:.2f}",
                 "-" if p["ci95"] is None else f"[{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}]",
                 "all > 0" if p["all_positive"] else "all < 0" if p["all_negative"] else "mixed",
                 ", ".join(f"{v:.2f}" for v in p["values"])] for p in s["pairs"]]  # fmt: skip
        lines += _table(["Difference", "Metric", "Mean", f"{CONFIDENCE:.0%} CI", "Sign", f"Per seed ({seeds})"], rows)
    return "\n".join(lines) + "\n"


def _header(metric: str) -> str:
    return metric[len(SET_PREFIX) :] if metric.startswith(SET_PREFIX) else HEADERS.get(metric, metric)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, Mapping):  # a stat
            return f"{v['mean']:.2f}" if v["sd"] is None else f"{v['mean']:.2f} ± {v['sd']:.2f}"
        return str(v)

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in rows
    ]


def study_figures(s: Mapping[str, Any]) -> dict[str, Figure]:
    """The plots that the study has data for, as Agg figures (to save, or to hand to TensorBoard)."""
    figures = {}
    for name, draw in (("severity", _severity_plot), ("corruptions", _corruption_bars), ("differences", _differences)):
        fig = new_figure()
        if draw(fig.add_subplot(), s):
            figures[name] = fig
    return figures


def plot_study(s: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Save ``study_figures`` as study_<name>.png in ``out_dir`` (apart from report.py's own plots)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in study_figures(s).items():
        paths[name] = out / f"study_{name}.png"
        fig.savefig(paths[name])
    return paths


def write_study(
    reports: Mapping[int, Mapping[str, Any]],
    out_dir: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> StudyFiles:
    """Write study.json, study.md and the study plots of one report per seed into ``out_dir``."""
    s = study(reports, metrics=metrics, pairs=pairs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(s, indent=1))
    (out / "study.md").write_text("# Multi-seed study\n\n" + study_markdown(s))
    return StudyFiles(out / "study.json", out / "study.md", plot_study(s, out))


def _sd(stat: Mapping[str, Any]) -> float:
    return 0.0 if stat["sd"] is None else stat["sd"]


def _severity_plot(ax: Axes, s: Mapping[str, Any]) -> int:
    """Accuracy vs severity (0 = clean), mean over seeds with +- sd error bars, one series per model."""
    for name, entry in s["models"].items():
        if "per_severity" in entry:
            points = [entry["metrics"].get("clean_acc"), *entry["per_severity"]]
            xs = [x for x, p in enumerate(points) if p is not None]
            ys, sds = [points[x]["mean"] for x in xs], [_sd(points[x]) for x in xs]
            ax.errorbar(xs, ys, yerr=sds, marker="o", capsize=3, label=name)
    ax.set(xlabel="severity (0 = clean)", ylabel="accuracy (%)",
           title=f"Accuracy vs severity, mean ± sd over {len(s['seeds'])} seeds")  # fmt: skip
    ax.set_xticks(range(len(SEVERITIES) + 1))
    return _finish(ax, len(ax.containers))


def _corruption_bars(ax: Axes, s: Mapping[str, Any]) -> int:
    """Grouped bars per corruption, one series per model, +- sd over seeds as error bars."""
    drawn = {n: e["per_corruption"] for n, e in s["models"].items() if e["per_corruption"]}
    corruptions = list(dict.fromkeys(c for table in drawn.values() for c in table))
    width = 0.8 / max(1, len(drawn))
    for i, (name, table) in enumerate(drawn.items()):
        ys = [table[c]["mean"] if c in table else np.nan for c in corruptions]
        sds = [_sd(table[c]) if c in table else 0.0 for c in corruptions]
        ax.bar(np.arange(len(corruptions)) + i * width, ys, width, yerr=sds, capsize=2, label=name)
    ax.set_xticks(np.arange(len(corruptions)) + 0.4 - width / 2, corruptions, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="accuracy (%), mean over severities", title=f"Accuracy per corruption over {len(s['seeds'])} seeds")
    return _finish(ax, len(drawn))


def _differences(ax: Axes, s: Mapping[str, Any]) -> int:
    """One point per pair and metric with its 95% CI as the error bar (none for one seed); a zero line."""
    labels = list(dict.fromkeys(f"{p['a']} - {p['b']}" for p in s["pairs"]))
    metrics = list(dict.fromkeys(p["metric"] for p in s["pairs"]))
    width = 0.8 / max(1, len(metrics))
    for i, m in enumerate(metrics):
        chosen = [p for p in s["pairs"] if p["metric"] == m]
        xs = [labels.index(f"{p['a']} - {p['b']}") + (i - (len(metrics) - 1) / 2) * width for p in chosen]
        half = [0.0 if p["ci95"] is None else p["ci95"][1] - p["mean"] for p in chosen]
        ax.errorbar(xs, [p["mean"] for p in chosen], yerr=half, fmt="o", capsize=3, label=_header(m))
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="difference (percentage points)",
           title=f"Paired differences, {CONFIDENCE:.0%} t-interval over {len(s['seeds'])} seeds")  # fmt: skip
    return _finish(ax, len(metrics))


def _finish(ax: Axes, n: int) -> int:
    if n:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return n
