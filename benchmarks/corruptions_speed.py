"""Speed of the torch corruption suite against ``imagecorruptions``, severity 3, 224 px.

Run from the repository root:  .venv/bin/python -m benchmarks.corruptions_speed
Writes benchmarks/results/corruptions_speed.json and the speed table of README.md
(``--markdown-only`` re-renders the table from the JSON). Targets: every corruption at least as fast as
the reference on the CPU (issue #15); geometric-mean speed-up >= 20x, glass_blur >= 100x (issue #3).

One process, torch with the threads the process has. Per corruption, after one warm-up call each: a torch
batch of 64 photos (float, B C H W), then the reference called one image at a time on uint8 H W C arrays,
as its users call it (``imagecorruptions.corrupt``), in alternating rounds; each side keeps its fastest
of 3 rounds, the least disturbed by other load on the machine (the load average before and after is
recorded). On a CUDA machine the same torch batch is timed on the GPU as well.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import machine, save_result
from robust.eval.corruptions import ALL, CPU_CHUNK_BYTES, corrupt
from tests.reference_corruptions import imagecorruptions, photos, to_uint8_hwc  # the patched package

RESULTS = Path(__file__).parent / "results" / "corruptions_speed.json"
DOC = Path(__file__).parents[1] / "README.md"
TARGET_MIN, TARGET_GEOMEAN, TARGET_GLASS = 1.0, 20.0, 100.0


def machine_info() -> dict:
    """What the numbers were measured on: the shared description plus this benchmark's libraries."""
    return {**machine(), "torch_threads": torch.get_num_threads(), "numpy": np.__version__,
            "imagecorruptions": version("imagecorruptions")}  # fmt: skip


def time_torch(x_BCHW: torch.Tensor, name: str, severity: int, gen: torch.Generator) -> float:
    """Seconds for one batch on ``x_BCHW``'s device."""
    sync = torch.cuda.synchronize if x_BCHW.is_cuda else lambda: None
    sync()
    start = time.perf_counter()
    corrupt(x_BCHW, name, severity, generator=gen)
    sync()
    return time.perf_counter() - start


def time_reference(images_HWC: list[np.ndarray], name: str, severity: int) -> float:
    """Mean seconds per image of ``imagecorruptions.corrupt`` on uint8 arrays, one image at a time."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        for img in images_HWC:
            imagecorruptions.corrupt(img, severity=severity, corruption_name=name)
        return (time.perf_counter() - start) / len(images_HWC)


def geomean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values)))) if values else float("nan")


def run(*, batch: int, size: int, severity: int, n_ref: int, rounds: int, names: list[str]) -> dict:
    load_before = os.getloadavg()
    imgs = photos(size)
    x_BCHW = imgs.repeat((batch + len(imgs) - 1) // len(imgs), 1, 1, 1)[:batch].contiguous()
    x_ref = list(to_uint8_hwc(x_BCHW[:n_ref]))
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for name in names:
        rows.append(_measure(name, x_BCHW, x_ref, severity, rounds, devices))
        print(_format_row(rows[-1]), flush=True)
    cpu = {r["corruption"]: r["speedup_cpu"] for r in rows}
    summary = {f"geomean_speedup_{d.type}": geomean([r[f"speedup_{d.type}"] for r in rows]) for d in devices}
    summary["min_speedup_cpu"] = min(cpu.values())
    summary["targets"] = {
        "every_cpu>=1": summary["min_speedup_cpu"] >= TARGET_MIN,
        "geomean_cpu>=20": summary["geomean_speedup_cpu"] >= TARGET_GEOMEAN,
        "glass_blur_cpu>=100": cpu["glass_blur"] >= TARGET_GLASS if "glass_blur" in cpu else None,
    }
    config = {
        "batch": batch, "size": size, "severity": severity, "n_ref_images": n_ref, "rounds": rounds,
        "statistic": "fastest of the rounds, each side", "cpu_chunk_bytes": CPU_CHUNK_BYTES,
        "load_avg_1_5_15_before": [round(v, 2) for v in load_before],
        "load_avg_1_5_15_after": [round(v, 2) for v in os.getloadavg()],
    }  # fmt: skip
    return {"machine": machine_info(), "config": config, "rows": rows, "summary": summary}


def _measure(
    name: str, x_BCHW: torch.Tensor, x_ref: list[np.ndarray], severity: int, rounds: int, devices: list
) -> dict:
    """Alternating rounds of one torch batch per device and the reference images; the fastest of each."""
    batches = {d.type: x_BCHW.to(d) for d in devices}
    gens = {d.type: torch.Generator(device=d).manual_seed(0) for d in devices}
    for dev, x in batches.items():  # warm-up: caches, lazy initialisation
        corrupt(x, name, severity, generator=gens[dev])
    time_reference(x_ref[:1], name, severity)
    torch_s = {dev: [] for dev in batches}
    ref_s = []
    for _ in range(rounds):
        for dev, x in batches.items():
            torch_s[dev].append(time_torch(x, name, severity, gens[dev]))
        ref_s.append(time_reference(x_ref, name, severity))
    row = {"corruption": name, "ref_img_per_s": 1 / min(ref_s)}
    for dev, times in torch_s.items():
        row[f"torch_{dev}_img_per_s"] = len(x_BCHW) / min(times)
        row[f"speedup_{dev}"] = row[f"torch_{dev}_img_per_s"] / row["ref_img_per_s"]
    return row


def _format_row(row: dict) -> str:
    gpu = f" {row['torch_cuda_img_per_s']:10.1f} {row['speedup_cuda']:9.1f}x" if "speedup_cuda" in row else ""
    return (
        f"{row['corruption']:18s} {row['ref_img_per_s']:9.1f} {row['torch_cpu_img_per_s']:10.1f}"
        f" {row['speedup_cpu']:9.2f}x{gpu}"
    )


def markdown(result: dict) -> str:
    """The speed table of README.md, from a result of ``run``."""
    m, c, s = result["machine"], result["config"], result["summary"]
    gpu = "speedup_cuda" in result["rows"][0]
    head = "| corruption | reference img/s | torch CPU img/s | speed-up |" + (" torch GPU img/s | speed-up |" if gpu else "")
    lines = [head, "|---|---:|---:|---:|" + ("---:|---:|" if gpu else "")]
    for r in result["rows"]:
        cuda = f" {r['torch_cuda_img_per_s']:.0f} | {r['speedup_cuda']:.0f}x |" if gpu else ""
        lines.append(
            f"| {r['corruption']} | {r['ref_img_per_s']:.1f} | {r['torch_cpu_img_per_s']:.1f} |"
            f" {r['speedup_cpu']:.1f}x |{cuda}"
        )
    cuda = f" | **{s['geomean_speedup_cuda']:.0f}x** |" if gpu else ""
    lines.append(f"| **geometric mean** | | | **{s['geomean_speedup_cpu']:.1f}x** |{cuda}")
    where = (
        f"Measured {m['date'][:10]} on {m['cpu']} ({m['cores']} cores, torch threads {m['torch_threads']}"
        f"{', GPU ' + m['gpu'] if m['gpu'] else ''}), torch {m['torch']}, imagecorruptions {m['imagecorruptions']};"
        f" one process; torch on a batch of {c['batch']} at {c['size']} px, the reference one image at a time"
        f" on {c['n_ref_images']} uint8 images; severity {c['severity']}; fastest of {c['rounds']} alternating"
        f" rounds each; load average {c['load_avg_1_5_15_before'][0]:.1f} before,"
        f" {c['load_avg_1_5_15_after'][0]:.1f} after. Slowest against the reference:"
        f" {min(result['rows'], key=lambda r: r['speedup_cpu'])['corruption']} at {s['min_speedup_cpu']:.2f}x."
    )
    return where + "\n\n" + "\n".join(lines) + "\n"


def update_doc(section: str, text: str, path: Path = DOC) -> None:
    """Replace the text between ``<!-- section -->`` and ``<!-- /section -->`` in ``path``."""
    doc = path.read_text()
    pattern = re.compile(rf"(<!-- {section} -->\n).*?(<!-- /{section} -->)", re.S)
    if not pattern.search(doc):
        raise ValueError(f"{path} has no '<!-- {section} -->' ... '<!-- /{section} -->' markers")
    path.write_text(pattern.sub(lambda match: match.group(1) + text + match.group(2), doc))
    print(f"updated the {section} section of {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--n-ref", type=int, default=8, help="images timed through the reference per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per corruption")
    parser.add_argument("--names", nargs="*", default=list(ALL))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--markdown-only", action="store_true", help="re-render the doc table from --out")
    args = parser.parse_args()
    if not args.markdown_only:
        print(f"{'corruption':18s} {'ref img/s':>9s} {'torch img/s':>10s} {'speed-up':>10s}  (cpu; then cuda if any)")
        result = run(batch=args.batch, size=args.size, severity=args.severity, n_ref=args.n_ref,
                     rounds=args.rounds, names=args.names)  # fmt: skip
        print(json.dumps(result["summary"], indent=1))
        save_result(args.out, result)
    update_doc("speed-table", markdown(json.loads(args.out.read_text())))


if __name__ == "__main__":
    main()
