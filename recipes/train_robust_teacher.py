"""Train RPT's small robust teacher on the student pool: AugMix (+ JSD), PixMix, DeepAugment.

    ray job submit --working-dir . -- python recipes/train_robust_teacher.py \\
        data.train_shards=/data/imagenet/train data.test_shards=/data/imagenet/val \\
        'train.augmentations=[augmix,deepaugment]' train.deepaugment.checkpoint=/ckpt/cae.safetensors
    python recipes/train_robust_teacher.py preset=local     # digits, on this machine

``train.augmentations`` picks any of augmix, deepaugment, pixmix (default: augmix + deepaugment, as in
the RPT paper); PixMix mixes with procedural fractals unless ``train.pixmix.mixing`` names a folder or
shards. Overrides are omegaconf dotlists; ``--help`` prints the full config with its defaults.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cluster.teacher_run import TEACHER_LOCAL_PRESET, RobustTeacherRecipeConfig, prepare_local, run  # noqa: E402
from robust.config import load_config, split_cli, to_yaml  # noqa: E402

PRESETS = {"local": TEACHER_LOCAL_PRESET}


def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        print(__doc__ + "\nDefaults:\n\n" + to_yaml(RobustTeacherRecipeConfig()))
        return 0
    preset, yaml_path, overrides = split_cli(argv)
    if preset is not None and preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; available: {sorted(PRESETS)}")
    try:
        cfg = load_config(RobustTeacherRecipeConfig, presets=[PRESETS[preset]] if preset else [],
                          yaml_path=yaml_path, overrides=overrides)
        if preset == "local":
            prepare_local(cfg)
        report = run(cfg)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    for name, entry in report["models"].items():
        print(f"{name:>10}: clean {entry['clean_acc']:.1f}%  corrupted {entry.get('corrupt_acc', float('nan')):.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
