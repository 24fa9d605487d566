"""``preset=local`` of the DAD job: the whole pipeline on one CPU machine on the built-in digits data set.

Cached stages (reused on a second run, under ``<run.out_dir>/cache``): digits shards, a small
AugMix-robust teacher and a small VQGAN (built side by side, one process and one thread each). Then
one student per method (CE, KD, DAD) trains through the real pools: one teacher actor and two DeepSpeed
ZeRO-2 workers on a local Ray cluster. The stages' settings are the preset's own ``local`` section.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from cluster.engine.stages import build_side_by_side
from cluster.jobs.dad import DadConfig
from cluster.jobs.local import DIGITS_CROP, RAY, STUDENT_POOL, TEACHER_POOL
from robust.cache import cache_dir_for, cached_stage
from robust.config import Preset
from robust.data.digits import build_digits_shards, digits_arrays
from robust.models.vqgan import VQGAN_PRESETS, VQGANConfig
from robust.models.vqgan_train import VQGANTrainConfig, train_vqgan
from robust.teacher_train import TeacherTrainConfig, cached_teacher, teacher_cache_dir

VQGAN_STAGE = "vqgan"


@dataclass
class LocalStages:
    """The cached stages: SPEC 4's local reference teacher (AugMix + JSD; 24 epochs: 85.8% corrupted
    against 80.5% after 12) and the coarse digits VQGAN (``digits32_f8_128``: a discretizer that moves an
    image by L2 ~6.5 makes DAD's samples differ from the clean ones; the 8x8-latent one reconstructs too
    well, benchmarks/results/local_recipe_search.json)."""

    teacher: TeacherTrainConfig = field(default_factory=lambda: TeacherTrainConfig(augmentations=["augmix"], epochs=24))
    vqgan: VQGANTrainConfig = field(default_factory=lambda: VQGANTrainConfig(
        vqgan=VQGANConfig(**VQGAN_PRESETS["digits32_f8_128"])))
    vqgan_steps: int = 600
    vqgan_threads: int = 1


@dataclass
class DadLocalConfig(DadConfig):
    local: LocalStages = field(default_factory=LocalStages)


# At 32 px the VQ round trip alone moves an image by L2 ~0.7, so eps 0.1 adds nothing: the attack
# budget is scaled to the image size and the discretizer's error (SPEC section 4, local reference).
OVERLAY: dict = {
    "data": {"max_in_flight_mb": 64},
    "teacher": {"kind": "timm"},
    "dad": {"eps": 1.0, "alpha": 1.0},
    "augment": {**DIGITS_CROP, "auto_augment": "", "re_prob": 0.0, "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0},
    "student": {"name": "test_resnet", "num_classes": 10, "pretrained": False, "drop_path_rate": None},
    # 12 epochs at lr 5e-3: every student's loss has flattened (under 1% of its decrease in the last
    # quarter); 6 epochs at 2e-3 left them fitting, 30 epochs cost 2.5x the time
    "optim": {"zero_stage": 2, "micro_batch_size": 64, "lr": 5e-3, "weight_decay": 0.01, "grad_clip": 1.0,
              "warmup_epochs": 1.0, "warmup_start_ratio": 0.0, "ema_decay": 0.0},
    "pools": {
        "teacher": TEACHER_POOL,
        # the teacher pool is the slower stage: on 2 shared cores it runs at its own speed (benchmarks/pipeline.py)
        "student": {**STUDENT_POOL, "nice": 10},
    },
    "run": {"name": "local", "methods": ["ce", "kd", "dad"], "epochs": 12, "checkpoint_every": 20, "log_every": 5},
    "ray": RAY,
}


def prepare(cfg: DadLocalConfig) -> dict[str, Path]:
    """Build (or reuse) the cached stages and point ``cfg`` at them; returns extra models to evaluate."""
    cache = Path(cfg.run.out_dir).expanduser().resolve() / "cache"
    dirs = build_digits_shards(cache / "digits")
    cfg.data.train_shards, cfg.data.test_shards = str(dirs["train"]), str(dirs["test"])
    build_side_by_side({
        teacher_cache_dir(cache, cfg.local.teacher): functools.partial(cached_teacher, cache, cfg.local.teacher),
        cache_dir_for(cache, VQGAN_STAGE, _vqgan_stage(cfg.local)): functools.partial(cached_vqgan, cache, cfg.local),
    })
    _, teacher_dir = cached_teacher(cache, cfg.local.teacher)
    cfg.teacher.timm = dataclasses.replace(cfg.local.teacher.model, checkpoint=str(teacher_dir))
    cfg.vqgan = cached_vqgan(cache, cfg.local)
    return {"teacher": teacher_dir}


LOCAL = Preset(OVERLAY, schema=DadLocalConfig, prepare=prepare)


def _vqgan_stage(cfg: LocalStages) -> dict:
    return {"vqgan": cfg.vqgan, "steps": cfg.vqgan_steps}


def cached_vqgan(cache: Path, cfg: LocalStages) -> VQGANConfig:
    """The local VQGAN trained on the digits train split (cached); returns its config with the checkpoint."""

    def build(out: Path) -> None:
        x_train = torch.from_numpy(digits_arrays()[0]).permute(0, 3, 1, 2).float() / 255
        threads = torch.get_num_threads()
        # One intra-op thread: OpenMP threads that share a busy 2-core machine spin and run 10-30x slower.
        torch.set_num_threads(cfg.vqgan_threads)
        try:
            vqgan, stats = train_vqgan(x_train, cfg.vqgan, steps=cfg.vqgan_steps)
        finally:
            torch.set_num_threads(threads)
        save_file(vqgan.state_dict(), out / "vqgan.safetensors")
        (out / "stats.json").write_text(json.dumps(stats, indent=2))

    out = cached_stage(cache, VQGAN_STAGE, _vqgan_stage(cfg), build)
    return dataclasses.replace(cfg.vqgan.vqgan, checkpoint=str(out / "vqgan.safetensors"))
