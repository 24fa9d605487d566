"""What a job prints at its end: the results table and where its report is."""

from __future__ import annotations


def print_summary(report: dict) -> None:
    reports = report["seeds"] if "seeds" in report else {None: report}
    for seed, one in reports.items():
        for name, entry in one["models"].items():
            where = f"seed {seed} " if seed is not None else ""
            print(f"{where}{name:>16}: clean {entry['clean_acc']:.1f}%  corrupted {entry.get('corrupt_acc', float('nan')):.1f}%")
