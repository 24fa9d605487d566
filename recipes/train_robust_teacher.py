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

from cluster.console import print_summary  # noqa: E402
from cluster.engine.runner import run_dir  # noqa: E402
from cluster.jobs.robust_teacher import RobustTeacherJobConfig, run  # noqa: E402
from cluster.jobs.robust_teacher_local import LOCAL  # noqa: E402
from robust.config import recipe_main  # noqa: E402


def main(argv: list[str]) -> int:
    recipe_main(argv, doc=__doc__, schema=RobustTeacherJobConfig, presets={"local": LOCAL},
                run=lambda cfg, _: print_summary(run(cfg), run_dir(cfg.run)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
