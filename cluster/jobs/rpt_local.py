"""``preset=local`` of the RPT job: the whole method on one CPU machine on the built-in digits.

Cached stages (under ``<run.out_dir>/cache``, shared with the DAD preset): digits shards, the "large"
model pretrained on clean digits (plain CE) and the small robust teacher trained with AugMix +
DeepAugment, built side by side (one process and one thread each). Then RPT and the baselines tune
the large model through the real pools. The stages' settings are the preset's own ``local`` section.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path

from cluster.engine.stages import build_side_by_side
from cluster.jobs.local import DIGITS_CROP, POOLS, RAY
from cluster.jobs.rpt import RptConfig
from robust.config import Preset
from robust.data.digits import build_digits_shards
from robust.models.timm_models import TimmConfig
from robust.teacher_train import TeacherTrainConfig, cached_teacher, teacher_cache_dir


@dataclass
class RptLocalStages:
    """The large model is timm's test ResNet (0.37M parameters) trained on clean crops; the robust teacher is
    3.7x smaller (test EfficientNet, 0.10M), as the paper's ResNet-50 teacher is to its ViT-L. With
    test_vit as the large model (its 16-px patches make 4 tokens of a 32-px digit) tuning its last blocks,
    or all of them, on the augmented data left corrupted accuracy where it was (benchmarks/rpt_recipe_search.py)."""

    large: TeacherTrainConfig = field(default_factory=lambda: TeacherTrainConfig(
        model=TimmConfig(name="test_resnet", num_classes=10), augmentations=[], epochs=15))
    teacher: TeacherTrainConfig = field(default_factory=lambda: TeacherTrainConfig(  # AugMix + DeepAugment
        model=TimmConfig(name="test_efficientnet", num_classes=10)))


@dataclass
class RptLocalConfig(RptConfig):
    local: RptLocalStages = field(default_factory=RptLocalStages)


OVERLAY: dict = {
    "data": {"max_in_flight_mb": 64},
    # the tuned part: the last stage (layer4) and the heads, 72% of the parameters but 6.6% of a forward's
    # FLOPs at 32 px (the frozen stages run on the larger feature maps; benchmarks/rpt_recipe_search.py)
    "large": {"timm": {"name": "test_resnet", "num_classes": 10, "pretrained": False}, "tune_from_block": 3},
    "robust_teacher": {"name": "test_efficientnet", "num_classes": 10},
    "augment": DIGITS_CROP,
    "augmented": {"deepaugment_fit_images": 1347},  # the whole digits train split
    "optim": {"zero_stage": 2, "micro_batch_size": 64, "lr": 2e-3, "weight_decay": 0.01, "warmup_epochs": 0.5},
    "pools": POOLS,
    "run": {"name": "rpt-local", "epochs": 4, "checkpoint_every": 20, "log_every": 5},
    "ray": RAY,
}


def prepare(cfg: RptLocalConfig) -> dict[str, Path]:
    """Build (or reuse) the cached stages and point ``cfg`` at them; returns extra models to evaluate."""
    cache = Path(cfg.run.out_dir).expanduser().resolve() / "cache"
    dirs = build_digits_shards(cache / "digits")
    cfg.data.train_shards, cfg.data.test_shards = str(dirs["train"]), str(dirs["test"])
    stages = (cfg.local.large, cfg.local.teacher)
    build_side_by_side({teacher_cache_dir(cache, s): functools.partial(cached_teacher, cache, s) for s in stages})
    _, large_dir = cached_teacher(cache, cfg.local.large)
    _, teacher_dir = cached_teacher(cache, cfg.local.teacher)
    cfg.large.timm = dataclasses.replace(cfg.local.large.model, checkpoint=str(large_dir))
    cfg.robust_teacher = dataclasses.replace(cfg.local.teacher.model, checkpoint=str(teacher_dir))
    return {"large (initial)": large_dir, "robust teacher": teacher_dir}


LOCAL = Preset(OVERLAY, schema=RptLocalConfig, prepare=prepare)
