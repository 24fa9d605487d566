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

from cluster.console import print_summary  # noqa: E402
from cluster.engine.runner import run_dir  # noqa: E402
from cluster.jobs.dad import DadConfig, run  # noqa: E402
from cluster.jobs.dad_local import LOCAL  # noqa: E402
from robust.config import recipe_main  # noqa: E402


def main(argv: list[str]) -> int:
    recipe_main(argv, doc=__doc__, schema=DadConfig, presets={"local": LOCAL},
                run=lambda cfg, extra: print_summary(run(cfg, extra_models=extra), run_dir(cfg.run)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
