"""Fidelity of the torch corruption suite against ``imagecorruptions``, every corruption x severity 1-5.

Run from the repository root:  .venv/bin/python -m benchmarks.corruptions_fidelity
Writes benchmarks/results/corruptions_fidelity.json and the fidelity tables of README.md
(``--markdown-only`` re-renders them from the JSON).

Data: scikit-image's photographs at 224 px and the 450-image digits test split at 32 px. The torch
output is truncated to uint8 like the reference's. Per corruption, severity and data set:
* deterministic corruptions: PSNR(torch, reference);
* all corruptions: the per-image mean and std of (corrupted - clean), averaged over images, in grey
  levels (0..255), for torch and the reference; for random corruptions these are what can match;
* digits: accuracy of a fixed small CNN (trained once on the clean train split, seeded) on the test
  split corrupted by torch vs by the reference. 450 images: differences under ~3 points are noise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.corruptions_speed import machine_info, update_doc
from benchmarks.machine import save_result
from robust.eval.corruptions import ALL, corrupt
from tests.reference_corruptions import (
    DETERMINISTIC, digits, photos, psnr, quantize_like_reference, reference_corrupt,
    shift_and_std,
)  # fmt: skip

RESULTS = Path(__file__).parent / "results" / "corruptions_fidelity.json"
SEVERITIES = (1, 2, 3, 4, 5)


class _PerImageStandardize(nn.Module):
    """Zero mean, unit std per image: keeps the probe from failing on global brightness/contrast alone."""

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        mean = x_BCHW.mean((1, 2, 3), keepdim=True)
        return (x_BCHW - mean) / (x_BCHW.std((1, 2, 3), keepdim=True) + 1e-3)


def train_probe(x_BCHW: torch.Tensor, y_B: torch.Tensor, *, epochs: int = 20, seed: int = 0) -> nn.Module:
    """A 3-conv CNN trained with Adam on clean digits; about 96% clean test accuracy."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        _PerImageStandardize(),
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x_BCHW), generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(x_BCHW[idx]), y_B[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x_BCHW: torch.Tensor, y_B: torch.Tensor) -> float:
    return (model(x_BCHW).argmax(1) == y_B).float().mean().item()


def compare(x_BCHW: torch.Tensor, name: str, severity: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Corrupt ``x_BCHW`` both ways; the statistics and the two corrupted batches."""
    gen = torch.Generator().manual_seed(severity)
    ours = quantize_like_reference(corrupt(x_BCHW, name, severity, generator=gen))
    ref = reference_corrupt(x_BCHW, name, severity, seed=1000 * severity)
    shift_t, std_t = shift_and_std(ours, x_BCHW)
    shift_r, std_r = shift_and_std(ref, x_BCHW)
    stats = {
        "psnr": psnr(ours, ref) if name in DETERMINISTIC else None,
        "shift_torch": shift_t, "shift_ref": shift_r, "std_torch": std_t, "std_ref": std_r,
    }  # fmt: skip
    return stats, ours, ref


def run(*, n_photos: int, n_digits: int, names: list[str]) -> dict:
    start = time.perf_counter()
    x_photos = photos(224)[:n_photos]
    x_train, y_train, x_test, y_test = digits()
    x_test, y_test = x_test[:n_digits], y_test[:n_digits]
    probe = train_probe(x_train, y_train)
    rows, errors = [], {}
    for name in names:
        try:
            for severity in SEVERITIES:
                row = {"corruption": name, "severity": severity, "deterministic": name in DETERMINISTIC}
                row["photos"], _, _ = compare(x_photos, name, severity)
                row["digits"], ours, ref = compare(x_test, name, severity)
                row["digits"]["acc_torch"] = accuracy(probe, ours, y_test)
                row["digits"]["acc_ref"] = accuracy(probe, ref, y_test)
                rows.append(row)
                print(_format_row(row), flush=True)
        except Exception as err:  # a missing or broken corruption is reported, not fatal
            errors[name] = f"{type(err).__name__}: {err}"
            print(f"{name:18s} not compared: {errors[name]}", flush=True)
    return {
        "machine": machine_info(),
        "config": {"n_photos": n_photos, "photo_size": 224, "n_digits": len(x_test), "digit_size": 32},
        "clean_acc": accuracy(probe, x_test, y_test),
        "rows": rows,
        "errors": errors,
        "runtime_s": time.perf_counter() - start,
    }


HEADER = (
    f"{'corruption':18s} sev | {'PSNR photo':>10s} {'digits':>6s} | {'std t/r photo':>13s} {'digits':>6s}"
    f" | {'shift t-r photo':>15s} {'digits':>6s} | {'acc torch':>9s} {'acc ref':>7s}"
)


def _ratio(stats: dict) -> float:
    """std torch / reference; 1 when both leave the image unchanged (saturate on grey digits)."""
    if stats["std_ref"] == 0:
        return 1.0 if stats["std_torch"] == 0 else float("inf")
    return stats["std_torch"] / stats["std_ref"]


def _format_row(row: dict) -> str:
    p, d = row["photos"], row["digits"]
    psnrs = f"{p['psnr']:10.1f} {d['psnr']:6.1f}" if row["deterministic"] else f"{'-':>10s} {'-':>6s}"
    return (
        f"{row['corruption']:18s} {row['severity']:3d} | {psnrs}"
        f" | {_ratio(p):13.2f} {_ratio(d):6.2f}"
        f" | {p['shift_torch'] - p['shift_ref']:15.2f} {d['shift_torch'] - d['shift_ref']:6.2f}"
        f" | {100 * d['acc_torch']:9.1f} {100 * d['acc_ref']:7.1f}"
    )


def markdown(result: dict) -> str:
    """The fidelity tables of README.md, from a result of ``run``."""
    m, c = result["machine"], result["config"]
    by_name: dict[str, list[dict]] = {}
    for row in result["rows"]:
        by_name.setdefault(row["corruption"], []).append(row)
    sev = [f"severity {s}" for s in SEVERITIES]
    psnr = ["| corruption | " + " | ".join(sev) + " |", "|---|" + "---:|" * len(sev)]
    stats = [
        "| corruption | PSNR min, photos / digits (dB) | std ratio torch/ref | shift torch - ref (max abs, levels)"
        " | digits accuracy torch - ref (points) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rows in by_name.items():
        if rows[0]["deterministic"]:
            cells = [f"{r['photos']['psnr']:.1f} / {r['digits']['psnr']:.1f}" for r in rows]
            psnr.append(f"| {name} | " + " | ".join(cells) + " |")
            worst = f"{min(r['photos']['psnr'] for r in rows):.1f} / {min(r['digits']['psnr'] for r in rows):.1f}"
        else:
            worst = "random"
        ratios = [_ratio(r[d]) for r in rows for d in ("photos", "digits")]
        shift = max(abs(r[d]["shift_torch"] - r[d]["shift_ref"]) for r in rows for d in ("photos", "digits"))
        acc = [100 * (r["digits"]["acc_torch"] - r["digits"]["acc_ref"]) for r in rows]
        stats.append(
            f"| {name} | {worst} | {min(ratios):.2f} - {max(ratios):.2f} | {shift:.2f} | {min(acc):+.1f} .. {max(acc):+.1f} |"
        )
    where = (
        f"Measured {m['date'][:10]} on {m['cpu']} ({m['cores']} cores), torch {m['torch']}, imagecorruptions"
        f" {m['imagecorruptions']}; {c['n_photos']} photos at {c['photo_size']} px and {c['n_digits']} digits at"
        f" {c['digit_size']} px; probe clean accuracy {100 * result['clean_acc']:.1f}%; runtime {result['runtime_s']:.0f} s."
    )
    return (
        f"{where}\n\nPSNR (dB) of torch vs reference, photos / digits (99 = identical):\n\n" + "\n".join(psnr)
        + "\n\nEvery corruption, over severities 1-5:\n\n" + "\n".join(stats) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-photos", type=int, default=4)
    parser.add_argument("--n-digits", type=int, default=450, help="first N of the 450 test digits")
    parser.add_argument("--names", nargs="*", default=list(ALL))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--markdown-only", action="store_true", help="re-render the doc tables from --out")
    args = parser.parse_args()
    if not args.markdown_only:
        print(HEADER)
        result = run(n_photos=args.n_photos, n_digits=args.n_digits, names=args.names)
        print(f"clean digits accuracy {100 * result['clean_acc']:.1f}; runtime {result['runtime_s']:.0f} s")
        save_result(args.out, result)
    update_doc("fidelity-tables", markdown(json.loads(args.out.read_text())))


if __name__ == "__main__":
    main()
