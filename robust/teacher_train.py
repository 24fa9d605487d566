"""The small robust teacher of the local default: a timm model trained with AugMix + JSD (SPEC 4, 6).

``train_augmix_teacher`` is one plain loop; ``cached_teacher`` trains it once on the digits train split
and keeps the export (``robust.models.timm_models.export_timm``) under a key made of the config.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from robust.augment import AugMixConfig, augmix_batch, augmix_transform, jsd_loss_fn
from robust.cache import cached_stage
from robust.data.digits import digits_arrays
from robust.models.timm_models import TimmConfig, build_timm, export_timm, load_exported

STEM = "teacher"


@dataclass
class TeacherTrainConfig:
    """AugMix + JSD training of a small timm teacher; the JSD weight is ``augmix.jsd_weight``."""

    # timm's 0.37M-parameter test ResNet: on 32 px digits it beat test_byobnet at equal epochs, and
    # resnet10t costs ~7x more per step; 12 epochs take ~80 s on one CPU thread (~99.8% clean accuracy)
    model: TimmConfig = field(default_factory=lambda: TimmConfig(name="test_resnet", num_classes=10))
    epochs: int = 12
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    augmix: AugMixConfig = field(default_factory=AugMixConfig)
    seed: int = 0
    threads: int = 1  # torch intra-op threads; AugMix runs in this same thread anyway


def train_augmix_teacher(
    x_train_NHWC: np.ndarray, y_train: np.ndarray, cfg: TeacherTrainConfig, *, progress: bool = True
) -> nn.Module:
    """Train ``cfg.model`` on uint8 (N, H, W, 3) images with AugMix + JSD; return it in eval mode.

    Deterministic given ``cfg.seed`` (timm's AugMix draws from Python's and numpy's global RNGs, so
    those are seeded too).
    """
    if cfg.epochs < 0:
        raise ValueError(f"epochs must be >= 0 (0 returns the seeded initialisation), got {cfg.epochs}")
    if len(x_train_NHWC) != len(y_train) or len(y_train) < cfg.batch_size:
        raise ValueError(
            f"need as many labels as images and at least batch_size={cfg.batch_size} of them, "
            f"got {len(x_train_NHWC)} images and {len(y_train)} labels"
        )
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    model = build_timm(cfg.model).train()
    transform = augmix_transform(cfg.augmix)
    loss_fn = jsd_loss_fn(cfg.augmix)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(y_train) // cfg.batch_size  # drop the last partial batch: BN sees full batches
    total_steps = cfg.epochs * steps_per_epoch
    y_N = torch.as_tensor(y_train, dtype=torch.long)

    step = 0
    bar = tqdm(total=total_steps, desc="teacher", disable=not progress)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(y_N)).numpy()
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            x_3BCHW = augmix_batch(x_train_NHWC[idx], transform)  # [clean; augmix1; augmix2]
            loss = loss_fn(model(x_3BCHW), y_N[idx])
            # linear warmup, then cosine decay to zero
            lr_scale = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
            lr_scale *= 0.5 * (1 + math.cos(math.pi * step / total_steps))
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_scale
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    torch.set_num_threads(threads_before)
    return model.eval()


def cached_teacher(cache_dir: str | Path, cfg: TeacherTrainConfig, *, progress: bool = True) -> tuple[nn.Module, Path]:
    """The frozen teacher for ``cfg`` and its directory ``cache_dir/teacher-<config hash>``: loaded if
    cached, else trained on the digits train split and exported (``teacher.safetensors``, ``teacher.json``)."""

    def build(out: Path) -> None:
        x_train, y_train, _, _ = digits_arrays()
        export_timm(train_augmix_teacher(x_train, y_train, cfg, progress=progress), cfg.model, out, stem=STEM)

    out = cached_stage(cache_dir, STEM, cfg, build)
    return load_exported(out, stem=STEM).eval().requires_grad_(False), out
