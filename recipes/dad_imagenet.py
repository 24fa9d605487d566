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
from cluster.ray_init import print_summary  # noqa: E402
from robust.config import recipe_main  # noqa: E402


def _run(cfg: DadRecipeConfig, preset: str | None) -> None:
    print_summary(run(cfg, extra_models=prepare_local(cfg) if preset == "local" else {}))


def main(argv: list[str]) -> int:
    recipe_main(argv, doc=__doc__, schema=DadRecipeConfig, presets={"local": LOCAL_PRESET}, run=_run)
    return 0

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
