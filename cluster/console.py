"""What a job prints at its end: the results table, and where its report, plots and TensorBoard runs are."""

from __future__ import annotations

from pathlib import Path

from cluster.engine.tracking import TENSORBOARD
from robust.eval.report import markdown
from robust.eval.study import study_markdown


def print_summary(result: dict, out: Path) -> None:
    """``result`` is a job's return: one seed's report, or {"seeds": ..., "study": ...} of a study."""
    if "study" in result:
        table = study_markdown(result["study"]).split("\n\n## ")[0]
        files = [out / "study.md", out / "study.json", *sorted(out.glob("study_*.png"))]
    elif result.get("models"):
        table = markdown(result).split("## Accuracy (%)\n\n")[1].split("\n\n")[0]
        files = [out / "report.md", out / "report.json", *sorted(out.glob("*.png"))]
    else:  # trained, nothing to evaluate on
        table, files = "", []
    print(f"\n{table}\n")
    for path in files:
        print(f"  {path}")
    if any(out.rglob(TENSORBOARD)):
        print(f"  training curves: tensorboard --logdir {out}")
