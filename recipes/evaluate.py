"""Evaluate models on shifted sets through the Ray cluster's teacher pool; write report.json/.md and plots.

    python recipes/evaluate.py preset=local              # the local DAD run's students and teacher on digits(-C)
    python recipes/evaluate.py config=eval.yaml models=[dad=runs/in1k/dad,timm:resnet50.a1_in1k,clip:ViT-B-16/openai]
    ray job submit --working-dir . -- python recipes/evaluate.py config=eval.yaml

A model is ``[NAME=]SPEC``: an export (its folder, or ``<stem>.json`` with ``<stem>.safetensors``),
``timm:<name>[.<tag>]`` (timm's pretrained weights) or ``clip:<arch>/<tag>`` (open_clip zero-shot).
Sets are ``robust.eval.sets.EvalSetConfig`` entries (kind, root, name, image_size, corruptions, ...);
the first is the in-distribution test set. See docs/evaluation.md. Overrides are omegaconf dotlists;
``config=FILE.yaml`` adds a YAML layer; ``--help`` prints the full config with its defaults.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cluster.eval_run import LOCAL_PRESET, EvalRecipeConfig, prepare_local, run  # noqa: E402
from robust.config import load_config, split_cli, to_yaml  # noqa: E402

PRESETS = {"local": LOCAL_PRESET}


def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        print(__doc__ + "\nDefaults:\n\n" + to_yaml(EvalRecipeConfig()))
        return 0
    try:
        preset, yaml_path, overrides = split_cli(argv)
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; available: {sorted(PRESETS)}")
        cfg = load_config(EvalRecipeConfig, presets=[PRESETS[preset]] if preset else [], yaml_path=yaml_path,
                          overrides=overrides)
        if preset == "local":
            prepare_local(cfg)
        report, files = run(cfg)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(files.markdown.read_text())
    print(f"report: {files.json} {files.markdown} {' '.join(map(str, files.plots.values()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
