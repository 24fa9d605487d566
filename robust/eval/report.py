"""The out-of-distribution report: report.json, report.md (tables like the papers') and PNG plots.

A report dict is ``{"models": {name: entry}, ...run metadata}``; an entry (``metrics.summarize`` makes
one, ``model_entry`` from per-set tallies) has accuracies in percent: "clean_acc", "corrupt_acc",
"per_corruption" {corruption: [acc at severity 1..5]}, "sets" {set: acc}, "weights", and optionally
"f_correct" (per key), "f_correct_overall", "tuned_params", "total_params", "flip_prob",
"mfr_unnormalised", and the training cost: "startup_s" (one-time start-up: cluster, data, models),
"train_s" (the training steps alone) and "train_samples" (samples trained on), from which
``write_report`` derives "samples_per_s" and "train_ms_per_sample" (``cost_fields``). "Avg shifts" is
the mean of the shifted-set accuracies and the mean corrupted accuracy. An optional "per_set" section
maps model -> set -> ``set_entry`` metrics.

mFR: the ImageNet-P paper divides each perturbation's flip probability by AlexNet's; those AlexNet
values are neither in SPEC section 7 nor in the benchmark's code (hendrycks/robustness
``ImageNet-P/test.py`` prints raw flip probabilities), so the report gives the unnormalised mean
flip probability and labels it so ("mfr_unnormalised").
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Any

import numpy as np

from robust.eval.corruptions import IMAGENET_C
from robust.eval.metrics import SEVERITIES, Tally, mean_corruption_error, summarize

if TYPE_CHECKING:  # matplotlib loads in ~0.5 s: only the processes that plot import it
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

COST_INPUTS = ("startup_s", "train_s", "train_samples")  # what a training run records per model
COST_FIELDS = (*COST_INPUTS, "samples_per_s", "train_ms_per_sample")


@dataclass
class ReportFiles:
    json: Path
    markdown: Path
    plots: dict[str, Path]  # plot name -> PNG
    series: dict[str, int]  # plot name -> lines (severity), bar series (corruptions) or points (cost)


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> ReportFiles:
    """Write report.json, report.md and the plots that the entries have data for into ``out_dir``."""
    models = report.get("models")
    if not isinstance(models, Mapping) or not models:
        raise ValueError("a report needs a non-empty 'models' mapping {name: entry}; see robust.eval.report")
    for name, entry in models.items():
        if "clean_acc" not in entry:
            raise ValueError(f"model {name!r} has no 'clean_acc'; every entry needs its clean accuracy")
    models = {name: {**entry, **cost_fields(entry)} for name, entry in models.items()}
    report = {**report, "models": models}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(markdown(report))
    plots, series = {}, {}
    for plot_name, draw in (("severity", _severity_plot), ("corruptions", _corruption_bars), ("cost", _cost_plot)):
        fig = new_figure()
        n = draw(fig.add_subplot(), models)
        if n:
            plots[plot_name] = out / f"{plot_name}.png"
            series[plot_name] = n
            fig.savefig(plots[plot_name])
    return ReportFiles(out / "report.json", out / "report.md", plots, series)


def cost_fields(entry: Mapping[str, Any]) -> dict[str, float]:
    """Training throughput "samples_per_s" and cost "train_ms_per_sample" of an entry with "train_s" and
    "train_samples" (start-up excluded); {} without them."""
    if "train_s" not in entry or "train_samples" not in entry:
        return {}
    seconds, samples = float(entry["train_s"]), float(entry["train_samples"])
    if seconds <= 0 or samples <= 0:
        raise ValueError(f"train_s={seconds} and train_samples={samples} must both be positive")
    return {"samples_per_s": samples / seconds, "train_ms_per_sample": 1000 * seconds / samples}


def new_figure() -> Figure:
    """A figure on matplotlib's Agg canvas (no display), the size of the report's plots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def mce_of(entry: Mapping[str, Any]) -> float | None:
    """mCE in percent from the entry's per-corruption accuracies, when all 15 x 5 are there."""
    table = entry.get("per_corruption", {})
    if not all(c in table and None not in table[c] and len(table[c]) == len(SEVERITIES) for c in IMAGENET_C):
        return None
    return 100 * mean_corruption_error({c: [1 - a / 100 for a in table[c]] for c in IMAGENET_C})


def set_entry(tally: Tally, name: str, *, n: int | None = None) -> dict[str, Any]:
    """Metrics of one set (percent) from its own tally: "acc", "top5", "ece" of its images as loaded,
    "corrupt_acc", "per_corruption", "mce", "relative_mce" of its X-C or stored corruptions, "flip_prob"
    and "mfr_unnormalised" for ImageNet-P, "n" samples when given."""
    summary = summarize(Tally({("clean" if key == name else key): sums for key, sums in tally.stats.items()}))
    entry: dict[str, Any] = {"n": n} if n is not None else {}
    if "clean_acc" in summary:
        entry.update(acc=summary["clean_acc"], top5=summary["clean_top5"], ece=summary["ece"]["clean"])
    for field in ("corrupt_acc", "per_corruption", "mce", "relative_mce", "flip_prob", "mfr_unnormalised"):
        if field in summary:
            entry[field] = summary[field]
    if "per_corruption" in entry and "mce" not in entry and mce_of(entry) is not None:
        entry["mce"] = mce_of(entry)  # stored ImageNet-C: mCE needs no clean accuracy
    return entry


def model_entry(per_set: Mapping[str, Tally], *, clean: str) -> dict[str, Any]:
    """One model's report entry from its tallies per set; ``clean`` names the in-distribution test set.

    The top-level corrupted accuracy, per-corruption table and mCE come from the first stored ImageNet-C
    set, else from the clean set's X-C. Every other set is a column of "sets": its accuracy under its
    name, and the mean accuracy of its X-C under "<name>-C" (a stored ImageNet-C set: under its name).
    """
    if clean not in per_set or clean not in per_set[clean].stats:
        raise ValueError(f"the in-distribution set {clean!r} must be a labelled set (not imagenet-c/-p)")
    corrupted = {name for name, t in per_set.items() if any(_is_corruption(k) for k in t.stats)}
    stored = [name for name in per_set if name in corrupted and name not in per_set[name].stats]
    source = stored[0] if stored else (clean if clean in corrupted else None)
    merged = Tally()
    for name, tally in per_set.items():
        for key, sums in tally.stats.items():
            if key == name:
                merged = merged + Tally({"clean" if name == clean else name: sums})
            elif name == source or not _is_corruption(key):  # ImageNet-P flips
                merged = merged + Tally({key: sums})
    entry = summarize(merged)
    sets: dict[str, float] = {}
    for name, tally in per_set.items():
        if name != clean and name in tally.stats:
            sets[name] = entry["sets"][name]
        if name in corrupted and name != source:
            sets[name if name in stored else f"{name}-C"] = set_entry(tally, name)["corrupt_acc"]
    entry.pop("sets", None)
    if sets:
        entry["sets"] = sets
    return entry


def _is_corruption(key: Any) -> bool:
    return isinstance(key, tuple) and key[0] != "flip"


def avg_shifts(entry: Mapping[str, Any]) -> float | None:
    values = list(entry.get("sets", {}).values()) + ([entry["corrupt_acc"]] if "corrupt_acc" in entry else [])
    return fmean(values) if values else None


def markdown(report: Mapping[str, Any]) -> str:
    models = report["models"]
    meta = {k: v for k, v in report.items() if k not in ("models", "per_set")}
    lines = ["# Robustness report", ""] + [f"- {k}: {v}" for k, v in meta.items()] + [""] * bool(meta)
    sets = list(dict.fromkeys(s for e in models.values() for s in e.get("sets", {})))
    lines += ["## Accuracy (%)", ""]
    header = ["Model", "Clean", *sets, "Corrupted (mean)", "mCE", "Avg shifts"]
    rows = [
        [n, e["clean_acc"], *[e.get("sets", {}).get(s) for s in sets], e.get("corrupt_acc"), mce_of(e), avg_shifts(e)]
        for n, e in models.items()
    ]
    lines += _table(header, rows)
    corruptions = list(dict.fromkeys(c for e in models.values() for c in e.get("per_corruption", {})))
    if corruptions:
        lines += ["", "## Accuracy per corruption (%), mean over severities", ""]
        rows = [[n, *[_mean(e.get("per_corruption", {}).get(c)) for c in corruptions]] for n, e in models.items()]
        lines += _table(["Model", *corruptions], rows)
        lines += ["", "## Accuracy per severity (%), mean over corruptions", ""]
        rows = [[n, e["clean_acc"], *_by_severity(e)] for n, e in models.items()]
        lines += _table(["Model", "clean", *map(str, SEVERITIES)], rows)
    perturbations = list(dict.fromkeys(p for e in models.values() for p in e.get("flip_prob", {})))
    if perturbations:
        lines += ["", "## ImageNet-P flip probability (%); mFR unnormalised (no AlexNet division)", ""]
        rows = [[n, *[e.get("flip_prob", {}).get(p) for p in perturbations], e.get("mfr_unnormalised")]
                for n, e in models.items()]  # fmt: skip
        lines += _table(["Model", *perturbations, "mFR (unnormalised)"], rows)
    extra = [k for k in ("f_correct_overall", "tuned_params", "total_params", *COST_FIELDS, "weights")
             if any(k in e for e in models.values())]  # fmt: skip
    if extra:
        lines += ["", "## Cost and parameters", ""]
        lines += _table(["Model", *extra], [[n, *[e.get(k) for k in extra]] for n, e in models.items()])
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.2f}"
        if isinstance(v, Mapping):
            return ", ".join(f"{k}: {cell(x)}" for k, x in v.items())
        return str(v)

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in rows
    ]


def _mean(values: list[float | None] | None) -> float | None:
    present = [v for v in values or [] if v is not None]
    return fmean(present) if present else None


def _by_severity(entry: Mapping[str, Any]) -> list[float | None]:
    table = entry.get("per_corruption", {}).values()
    return [_mean([accs[i] for accs in table]) for i in range(len(SEVERITIES))]


def _severity_plot(ax: Axes, models: Mapping[str, Any]) -> int:
    """Accuracy vs severity, one line per model (RPT Fig. 3); severity 0 is the clean accuracy."""
    for name, entry in models.items():
        if entry.get("per_corruption"):
            ys = [entry["clean_acc"], *_by_severity(entry)]
            ax.plot(range(len(ys)), [np.nan if y is None else y for y in ys], marker="o", label=name)
    ax.set(xlabel="severity (0 = clean)", ylabel="accuracy (%)", title="Accuracy vs severity (mean over corruptions)")
    ax.set_xticks(range(len(SEVERITIES) + 1))
    return _finish(ax, len(ax.get_lines()))


def _corruption_bars(ax: Axes, models: Mapping[str, Any]) -> int:
    """Grouped bars: one group per corruption, one bar series per model."""
    drawn = {n: e["per_corruption"] for n, e in models.items() if e.get("per_corruption")}
    corruptions = list(dict.fromkeys(c for table in drawn.values() for c in table))
    width = 0.8 / max(1, len(drawn))
    for i, (name, table) in enumerate(drawn.items()):
        ys = [_mean(table.get(c)) for c in corruptions]
        ax.bar(np.arange(len(corruptions)) + i * width, [np.nan if y is None else y for y in ys], width, label=name)
    ax.set_xticks(np.arange(len(corruptions)) + 0.4 - width / 2, corruptions, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="accuracy (%), mean over severities", title="Accuracy per corruption")
    return _finish(ax, len(ax.containers))


def _cost_plot(ax: Axes, models: Mapping[str, Any]) -> int:
    """Robustness vs training cost per sample, one point per model with a known cost (RPT Fig. 1)."""
    n = 0
    for name, entry in models.items():
        x, y = entry.get("train_ms_per_sample"), entry.get("corrupt_acc")
        if x is not None and y is not None:
            ax.scatter([x], [y], label=name)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            n += 1
    ax.set(xlabel="training cost (ms / sample)", ylabel="corrupted accuracy (%)", title="Robustness vs training cost")
    return _finish(ax, n)


def _finish(ax: Axes, n: int) -> int:
    if n:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return n
