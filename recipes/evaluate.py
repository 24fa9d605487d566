"""Evaluate models on shifted sets through the Ray cluster's teacher pool; write report.json/.md and plots.

    python recipes/evaluate.py preset=local              # the local DAD run's students and teacher on digits(-C)
    python recipes/evaluate.py config=eval.yaml models=[dad=runs/in1k/dad,timm:resnet50.a1_in1k,clip:ViT-B-16/openai]
    ray job submit --working-dir . -- python recipes/evaluate.py config=eval.yaml

A model is ``[NAME=]SPEC``: an export folder (timm's own format, or an RPT export), ``timm:<name>[.<tag>]``
(timm's pretrained weights) or ``clip:<arch>/<tag>`` (open_clip zero-shot). Sets are
``robust.eval.sets.EvalSetConfig`` entries (kind, root, name, image_size, corruptions, shifted, ...); the
in-distribution test set is the one with ``shifted: false``. See docs/evaluation.md. Overrides are omegaconf
dotlists; ``config=FILE.yaml`` adds a YAML layer; ``--help`` prints the full config with its defaults.
The same evaluation runs in one process, without Ray, with ``robust.eval.benchmark.benchmark``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cluster.jobs.evaluation import EvaluationConfig, run  # noqa: E402
from cluster.jobs.evaluation_local import LOCAL  # noqa: E402
from robust.config import recipe_main  # noqa: E402


def _run(cfg: EvaluationConfig, _) -> None:
    _, files = run(cfg)
    print(files.markdown.read_text())
    print(f"report: {files.json} {files.markdown} {' '.join(map(str, files.plots.values()))}")


def main(argv: list[str]) -> int:
    recipe_main(argv, doc=__doc__, schema=EvaluationConfig, presets={"local": LOCAL}, run=_run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
