"""Speed of the torch corruption suite vs ``imagecorruptions`` (per-image numpy loop), severity 3, 224 px.

Run from the repository root:  .venv/bin/python -m benchmarks.corruptions_speed
Writes benchmarks/results/corruptions_speed.json. Targets (issue): geometric-mean speed-up >= 20x on
CPU, glass_blur >= 100x. Both sides are timed in the same run, corruption by corruption, because the
machine is shared and its load drifts; each time is a median over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from robust.eval.corruptions import ALL, corrupt
from benchmarks.machine import machine, save_result
from tests.reference_corruptions import photos, reference_corrupt

RESULTS = Path(__file__).parent / "results" / "corruptions_speed.json"
TARGET_GEOMEAN, TARGET_GLASS = 20.0, 100.0


def machine_info() -> dict:
    """What the numbers were measured on: the shared description plus this benchmark's libraries."""
    return {**machine(), "torch_threads": torch.get_num_threads(), "numpy": np.__version__,
            "imagecorruptions": version("imagecorruptions")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_torch(x_BCHW: torch.Tensor, name: str, severity: int, *, repeats: int) -> float:
    """Median seconds for one batch on ``x_BCHW``'s device, after one warm-up call."""
    gen = torch.Generator(device=x_BCHW.device).manual_seed(0)
    corrupt(x_BCHW, name, severity, generator=gen)
    times = []
    for _ in range(repeats):
        _sync(x_BCHW.device)
        start = time.perf_counter()
        corrupt(x_BCHW, name, severity, generator=gen)
        _sync(x_BCHW.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_reference(x_BCHW: torch.Tensor, name: str, severity: int) -> float:
    """Median seconds per image of the reference (conversion to uint8 HWC included, as a user pays it)."""
    times = []
    for i in range(len(x_BCHW)):
        start = time.perf_counter()
        reference_corrupt(x_BCHW[i : i + 1], name, severity, seed=i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def geomean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values)))) if values else float("nan")


def run(*, batch: int, size: int, severity: int, n_ref: int, repeats: int, names: list[str]) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    imgs = photos(size)
    x_BCHW = imgs.repeat((batch + len(imgs) - 1) // len(imgs), 1, 1, 1)[:batch].contiguous()
    x_ref = imgs.repeat((n_ref + len(imgs) - 1) // len(imgs), 1, 1, 1)[:n_ref]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows, errors = [], {}
    for name in names:
        try:
            per_device = {d.type: time_torch(x_BCHW.to(d), name, severity, repeats=repeats) for d in devices}
        except Exception as err:  # a missing or broken corruption is reported, not fatal
            errors[name] = f"{type(err).__name__}: {err}"
            continue
        ref_s = time_reference(x_ref, name, severity)
        row = {"corruption": name, "ref_img_per_s": 1 / ref_s}
        for dev, batch_s in per_device.items():
            row[f"torch_{dev}_img_per_s"] = batch / batch_s
            row[f"speedup_{dev}"] = ref_s * batch / batch_s
        rows.append(row)
        print(_format_row(row), flush=True)
    summary = {f"geomean_speedup_{d.type}": geomean([r[f"speedup_{d.type}"] for r in rows]) for d in devices}
    glass = next((r["speedup_cpu"] for r in rows if r["corruption"] == "glass_blur"), None)
    summary["targets"] = {
        "geomean_cpu>=20": summary["geomean_speedup_cpu"] >= TARGET_GEOMEAN,
        "glass_blur_cpu>=100": None if glass is None else glass >= TARGET_GLASS,
    }
    config = {"batch": batch, "size": size, "severity": severity, "n_ref_images": n_ref, "repeats": repeats}
    return {"machine": machine_info(), "config": config, "rows": rows, "summary": summary, "errors": errors}


def _format_row(row: dict) -> str:
    gpu = f" {row['torch_cuda_img_per_s']:10.1f} {row['speedup_cuda']:9.1f}x" if "speedup_cuda" in row else ""
    return (
        f"{row['corruption']:18s} {row['ref_img_per_s']:9.2f} {row['torch_cpu_img_per_s']:10.1f}"
        f" {row['speedup_cpu']:9.1f}x{gpu}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--n-ref", type=int, default=4, help="images timed through the reference")
    parser.add_argument("--repeats", type=int, default=3, help="timed torch batches per corruption")
    parser.add_argument("--names", nargs="*", default=list(ALL))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    print(f"{'corruption':18s} {'ref img/s':>9s} {'torch img/s':>10s} {'speed-up':>10s}  (cpu; then cuda if any)")
    result = run(batch=args.batch, size=args.size, severity=args.severity, n_ref=args.n_ref,
                 repeats=args.repeats, names=args.names)  # fmt: skip
    print(json.dumps(result["summary"], indent=1))
    for name, err in result["errors"].items():
        print(f"not measured: {name}: {err}")
    save_result(args.out, result)


if __name__ == "__main__":
    main()
