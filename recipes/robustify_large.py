"""RPT: robustify a large pretrained model by tuning its last layers from a small robust teacher.

    ray job submit --working-dir . -- python recipes/robustify_large.py \\
        data.train_shards=/data/imagenet/train data.test_shards=/data/imagenet/val \\
        robust_teacher.checkpoint=/ckpt/resnet50_augmix_deepaugment
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

from cluster.console import print_summary  # noqa: E402
from cluster.engine.runner import run_dir  # noqa: E402
from cluster.jobs.rpt import RptConfig, run  # noqa: E402
from cluster.jobs.rpt_local import LOCAL  # noqa: E402
from robust.config import recipe_main  # noqa: E402


def main(argv: list[str]) -> int:
    recipe_main(argv, doc=__doc__, schema=RptConfig, presets={"local": LOCAL},
                run=lambda cfg, extra: print_summary(run(cfg, extra_models=extra), run_dir(cfg.run)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
