"""DAD on ImageNet (or any shard set): CLIP ViT-L/14 teacher, VQGAN discretizer, ViT-B/16 student.

    ray job submit --working-dir . -- python recipes/dad_imagenet.py \\
        data.train_shards=/data/imagenet/train data.test_shards=/data/imagenet/val \\
        vqgan.checkpoint=/ckpt/vqgan_openimages_f8_16384.ckpt
    python recipes/dad_imagenet.py preset=local        # digits, on this machine, in minutes

Overrides are omegaconf dotlists (``dad.steps=3``); ``config=FILE.yaml`` adds a YAML layer;
``--help`` prints the full config with its defaults.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cluster.dad_run import DadRecipeConfig, run  # noqa: E402
from cluster.local import LOCAL_PRESET, prepare_local  # noqa: E402
from robust.config import load_config, split_cli, to_yaml  # noqa: E402

PRESETS = {"local": LOCAL_PRESET}


def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        print(__doc__ + "\nDefaults:\n\n" + to_yaml(DadRecipeConfig()))
        return 0
    preset, yaml_path, overrides = split_cli(argv)
    if preset is not None and preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; available: {sorted(PRESETS)}")
    try:
        cfg = load_config(DadRecipeConfig, presets=[PRESETS[preset]] if preset else [], yaml_path=yaml_path,
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
