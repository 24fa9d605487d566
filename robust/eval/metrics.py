"""Evaluation metrics as per-batch sums and counts (a ``Tally``) that add up across batches and workers.

A tally maps a key to named float64 sums. Keys say what was measured: ``"clean"``, a set name
(``"imagenet-r"``), a corruption ``(name, severity)``, or ``("flip", perturbation)`` for ImageNet-P.
Reduce with ``+`` (``sum(tallies, Tally())``); ``summarize`` turns the totals into a report entry in
percent, the unit of the papers' tables. ``tally_to_columns`` flattens a tally into numeric and string
numpy columns (Arrow holds them natively, e.g. as a Ray Data batch) and ``tally_from_columns`` restores it.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any

import numpy as np
import torch

from robust.eval.corruptions import ALL, IMAGENET_C

Key = Hashable
ECE_BINS = 15
SEVERITIES = (1, 2, 3, 4, 5)

# AlexNet top-1 error on ImageNet-C, averaged over the 5 severities (SPEC section 7; Hendrycks & Dietterich 2019).
ALEXNET_ERROR: dict[str, float] = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
    "snow": 0.866816, "frost": 0.826572, "fog": 0.819324,
    "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056, "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}  # fmt: skip
ALEXNET_CLEAN_ERROR = 0.4348


@dataclass
class Tally:
    """Named sums per key; ``a + b`` adds matching sums and keeps the rest."""

    stats: dict[Key, dict[str, torch.Tensor]] = field(default_factory=dict)

    def __add__(self, other: Tally) -> Tally:
        out = {key: dict(named) for key, named in self.stats.items()}
        for key, named in other.stats.items():
            mine = out.setdefault(key, {})
            for name, value in named.items():
                mine[name] = mine[name] + value if name in mine else value
        return Tally(out)

    def _get(self, key: Key, name: str) -> torch.Tensor:
        if key not in self.stats or name not in self.stats[key]:
            raise ValueError(f"the tally has no {name!r} for {key!r}; it has {sorted(map(str, self.stats))}")
        return self.stats[key][name]

    def accuracy(self, key: Key, *, k: int = 1) -> float:
        """Top-1 (k=1) or top-5 (k=5) accuracy as a fraction."""
        return float(self._get(key, f"top{k}") / self._get(key, "n"))

    def ece(self, key: Key) -> float:
        """Expected calibration error (Guo et al. 2017): sum_b |acc_b - conf_b| * n_b / n, equal-width bins."""
        gap = (self._get(key, "correct_bins") - self._get(key, "conf_bins")).abs().sum()
        return float(gap / self._get(key, "n"))

    def flip_probability(self, key: Key) -> float:
        return float(self._get(key, "flips") / self._get(key, "pairs"))

    def f_correct(self, key: Key) -> float:
        """RPT's F_correct: the fraction of samples whose inference picked the right head."""
        return float(self._get(key, "routed_right") / self._get(key, "routed_n"))


def tally_to_columns(tally: Tally) -> dict[str, np.ndarray]:
    """The tally as equal-length columns, one row per element of every sum: "key" (the key as JSON: a
    string, or a list for a tuple key), "name", "index" (the element's position in a vector sum such as
    the ECE bins, -1 for a scalar sum) and "value" (float64). ``tally_from_columns`` inverts it exactly."""
    keys, names, index, values = [], [], [], []
    for key, named in tally.stats.items():
        assert isinstance(key, (str, tuple)), key  # JSON round-trips str and (str | int, ...) keys
        for name, sum_ in named.items():
            flat = sum_.reshape(-1).tolist()
            keys += [json.dumps(key)] * len(flat)
            names += [name] * len(flat)
            index += [-1] if sum_.ndim == 0 else list(range(len(flat)))
            values += flat
    return {"key": np.array(keys, dtype=str), "name": np.array(names, dtype=str),
            "index": np.array(index, dtype=np.int64), "value": np.array(values, dtype=np.float64)}  # fmt: skip


def tally_from_columns(columns: Mapping[str, np.ndarray]) -> Tally:
    """The tally of ``tally_to_columns``'s columns, in any row order (other columns are ignored)."""
    elements: dict[Key, dict[str, list[tuple[int, float]]]] = {}
    for key_json, name, i, value in zip(columns["key"], columns["name"], columns["index"], columns["value"]):
        loaded = json.loads(key_json)
        key = tuple(loaded) if isinstance(loaded, list) else loaded
        elements.setdefault(key, {}).setdefault(str(name), []).append((int(i), float(value)))
    return Tally({key: {name: _from_elements(pairs) for name, pairs in named.items()}
                  for key, named in elements.items()})  # fmt: skip


def _from_elements(pairs: list[tuple[int, float]]) -> torch.Tensor:
    if pairs[0][0] == -1:  # a scalar sum
        assert len(pairs) == 1, pairs
        return torch.tensor(pairs[0][1], dtype=torch.float64)
    return torch.tensor([v for _, v in sorted(pairs)], dtype=torch.float64)


def _sums(**named: torch.Tensor | float) -> dict[str, torch.Tensor]:
    return {name: torch.as_tensor(value, dtype=torch.float64).detach().cpu() for name, value in named.items()}


def classification_tally(
    logits_BK: torch.Tensor, y_B: torch.Tensor, *, key: Key = "clean", n_bins: int = ECE_BINS
) -> Tally:
    """Top-1/top-5 correct counts, the count, and per-bin confidence/correct/count sums for the ECE."""
    k = min(5, logits_BK.shape[1])
    top_BK = logits_BK.topk(k, dim=1).indices
    y_B = y_B.to(logits_BK.device)
    correct_B = (top_BK[:, 0] == y_B).double()
    conf_B = logits_BK.double().softmax(dim=1).amax(dim=1)
    # Bins (i/M, (i+1)/M]; a confidence of exactly 0 falls in the first bin.
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=conf_B.device)[1:-1]
    bin_B = torch.bucketize(conf_B, edges)
    zeros = torch.zeros(n_bins, dtype=torch.float64, device=conf_B.device)
    named = _sums(
        top1=correct_B.sum(),
        top5=(top_BK == y_B[:, None]).any(dim=1).double().sum(),
        n=float(len(y_B)),
        conf_bins=zeros.index_add(0, bin_B, conf_B),
        correct_bins=zeros.index_add(0, bin_B, correct_B),
        count_bins=zeros.index_add(0, bin_B, torch.ones_like(conf_B)),
    )
    return Tally({key: named})


def flip_tally(preds_BT: torch.Tensor, *, perturbation: str, step: int = 1) -> Tally:
    """Prediction flips over ImageNet-P sequences (Hendrycks & Dietterich 2019, sec. 4).

    Noise perturbations compare every frame with the first; the others compare frames ``step`` apart
    (consecutive frames for step 1, the benchmark's difficulty 1), as the official ``test.py`` does.
    """
    if "noise" in perturbation:
        flips_BT = preds_BT[:, 1:] != preds_BT[:, :1]
    else:
        if not 1 <= step < preds_BT.shape[1]:
            raise ValueError(f"step must be in [1, {preds_BT.shape[1] - 1}] for {preds_BT.shape[1]} frames, got {step}")
        flips_BT = preds_BT[:, step:] != preds_BT[:, :-step]
    return Tally({("flip", perturbation): _sums(flips=flips_BT.sum(), pairs=float(flips_BT.numel()))})


def routing_tally(chose_clean_B: torch.Tensor, *, key: Key, shifted: bool) -> Tally:
    """F_correct counts: the clean head is right on in-distribution data, the unclean head on shifted data."""
    right_B = chose_clean_B.bool() != shifted
    return Tally({key: _sums(routed_right=right_B.sum(), routed_n=float(right_B.numel()))})


def _check_table(errors: Mapping[str, Sequence[float]]) -> None:
    unknown = sorted(set(errors) - set(ALEXNET_ERROR))
    if unknown:
        raise ValueError(f"no AlexNet normalisation for {unknown}; CE is defined for {list(IMAGENET_C)}")
    short = {c: len(e) for c, e in errors.items() if len(e) != len(SEVERITIES)}
    if short:
        raise ValueError(f"CE needs the error at all 5 severities; got {short} values")


def corruption_errors(errors: Mapping[str, Sequence[float]], *, clean_error: float | None = None) -> dict[str, float]:
    """CE_c = sum_s E_sc / sum_s E^AlexNet_sc (Hendrycks & Dietterich 2019, sec. 3); errors are fractions.

    With ``clean_error`` it is the relative CE: sum_s (E_sc - E_clean) / sum_s (E^AlexNet_sc - E^AlexNet_clean).
    The AlexNet constants are means over severities, so each AlexNet sum is 5 x the constant.
    """
    _check_table(errors)
    n = len(SEVERITIES)
    if clean_error is None:
        return {c: sum(e) / (n * ALEXNET_ERROR[c]) for c, e in errors.items()}
    return {c: (sum(e) - n * clean_error) / (n * (ALEXNET_ERROR[c] - ALEXNET_CLEAN_ERROR)) for c, e in errors.items()}


def mean_corruption_error(errors: Mapping[str, Sequence[float]], *, clean_error: float | None = None) -> float:
    """mCE (or relative mCE with ``clean_error``): the mean CE over all 15 ImageNet-C corruptions."""
    missing = sorted(set(IMAGENET_C) - set(errors))
    if missing:
        raise ValueError(f"mCE averages all 15 ImageNet-C corruptions; missing {missing}")
    return fmean(corruption_errors(errors, clean_error=clean_error).values())


def mean_flip_rate(flip_probs: Mapping[str, float], *, alexnet: Mapping[str, float] | None = None) -> float:
    """mFR: the mean over perturbations of FP_p, each divided by AlexNet's FP_p when ``alexnet`` is given.

    AlexNet's per-perturbation flip probabilities are not published in the ImageNet-P code, so by default
    this is the unnormalised mean flip probability.
    """
    if alexnet is None:
        return fmean(flip_probs.values())
    missing = sorted(set(flip_probs) - set(alexnet))
    if missing:
        raise ValueError(f"no AlexNet flip probability for {missing}")
    return fmean(fp / alexnet[p] for p, fp in flip_probs.items())


def summarize(tally: Tally) -> dict[str, Any]:
    """A report entry (percent): clean_acc, corrupt_acc, per_corruption, sets, mCE, ECE, F_correct, mFR."""
    pct = lambda v: 100.0 * v  # noqa: E731
    corrupt = {key: tally.accuracy(key) for key in tally.stats if isinstance(key, tuple) and key[0] != "flip"}
    flips = {key[1]: tally.flip_probability(key) for key in tally.stats if isinstance(key, tuple) and key[0] == "flip"}
    labelled = [key for key in tally.stats if isinstance(key, str) and "n" in tally.stats[key]]
    entry: dict[str, Any] = {}
    if "clean" in labelled:
        entry["clean_acc"] = pct(tally.accuracy("clean"))
        entry["clean_top5"] = pct(tally.accuracy("clean", k=5))
    if corrupt:
        entry["corrupt_acc"] = pct(fmean(corrupt.values()))
        present = {c for c, _ in corrupt}
        names = [c for c in ALL if c in present] + sorted(present - set(ALL))
        entry["per_corruption"] = {
            c: [pct(corrupt[(c, s)]) if (c, s) in corrupt else None for s in SEVERITIES] for c in names
        }
        full = all((c, s) in corrupt for c in IMAGENET_C for s in SEVERITIES)
        if full and "clean" in labelled:
            errors = {c: [1 - corrupt[(c, s)] for s in SEVERITIES] for c in IMAGENET_C}
            entry["mce"] = pct(mean_corruption_error(errors))
            entry["relative_mce"] = pct(mean_corruption_error(errors, clean_error=1 - tally.accuracy("clean")))
    sets = {key: pct(tally.accuracy(key)) for key in labelled if key != "clean"}
    if sets:
        entry["sets"] = sets
    if labelled:
        entry["ece"] = {key: pct(tally.ece(key)) for key in labelled}
    routed = {key: pct(tally.f_correct(key)) for key in tally.stats if "routed_n" in tally.stats[key]}
    if routed:
        entry["f_correct"] = {str(key): v for key, v in routed.items()}
        # one number like the paper's: right routings over all routed samples, clean and shifted pooled
        right, n = (sum(float(tally.stats[k][f]) for k in routed) for f in ("routed_right", "routed_n"))
        entry["f_correct_overall"] = pct(right / n)
    if flips:
        entry["flip_prob"] = {p: pct(v) for p, v in flips.items()}
        entry["mfr_unnormalised"] = pct(mean_flip_rate(flips))
    return entry
