"""RPT: robustify a large pretrained model by tuning its last layers from a small robust teacher.

    ray job submit --working-dir . -- python recipes/robustify_large.py \\
        data.train_shards=/data/imagenet/train data.test_shards=/data/imagenet/val \\
        robust_teacher.checkpoint=/ckpt/resnet50_augmix_deepaugment.safetensors
    python recipes/robustify_large.py preset=local     # digits, on this machine

Methods (``run.methods``): rpt, and the baselines apt, full_finetune, wise_ft (alphas ``run.wise_alphas``),
linear_probe, vpt, only_kd, single_teacher, rpt_no_kd. ``run.feature_cache`` trains the partially tuned
methods from the frozen backbone's cached features. Overrides are omegaconf dotlists; ``--help`` prints
the full config with its defaults.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cluster.rpt_run import RptRecipeConfig, run  # noqa: E402
from cluster.rpt_local import RPT_LOCAL_PRESET, prepare_local  # noqa: E402
from robust.config import load_config, split_cli, to_yaml  # noqa: E402

PRESETS = {"local": RPT_LOCAL_PRESET}


def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        print(__doc__ + "\nDefaults:\n\n" + to_yaml(RptRecipeConfig()))
        return 0
    preset, yaml_path, overrides = split_cli(argv)
    if preset is not None and preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; available: {sorted(PRESETS)}")
    try:
        cfg = load_config(RptRecipeConfig, presets=[PRESETS[preset]] if preset else [], yaml_path=yaml_path,
                          overrides=overrides)
        extra = prepare_local(cfg) if preset == "local" else {}
        report = run(cfg, extra_models=extra)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    for name, entry in report["models"].items():
        print(f"{name:>10}: clean {entry['clean_acc']:.1f}%  corrupted {entry.get('corrupt_acc', float('nan')):.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
