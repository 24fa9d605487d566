"""The small robust teacher: a timm model trained with AugMix (+ JSD), DeepAugment and/or PixMix (SPEC 5, 6).

``TeacherTrainConfig.augmentations`` selects the combination; the default, AugMix + DeepAugment, is the
robust teacher of the RPT paper (and DeepAugment + AugMix the best ImageNet-R/-C model of the
DeepAugment paper). Applied in this order:

- ``deepaugment``: ``deepaugment.copies`` DeepAugment copies of the training set, made once before
  training (``robust.deepaugment``), are extra training samples beside the originals, same labels;
- ``pixmix``: each training image is replaced by its PixMix, as the PixMix paper trains
  (``robust.pixmix``; mixing pictures from ``pixmix.mixing``);
- ``augmix``: the batch becomes the split-major ``[x; augmix1(x); augmix2(x)]``, trained with CE +
  Jensen-Shannon consistency (``robust.augment``). Without it, the loss is plain CE.

Per batch, ``teacher_batch`` prepares the input (CPU) and ``robust_teacher_loss`` is the step's loss:
a distributed trainer calls these two. ``train_robust_teacher`` is one plain loop over them;
``cached_teacher`` trains once on the digits train split and keeps the export
(``robust.models.timm_models.export_timm``: a timm folder) under a key made of the config.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from robust.augment import AugMixConfig, augmix_batch, augmix_transform, jsd_loss_fn
from robust.cache import cache_dir_for, cached_stage
from robust.data.digits import digits_arrays
from robust.deepaugment import DeepAugConfig, autoencoder_for, deepaugment_dataset
from robust.eval.sets import EvalSetConfig, timm_data_config
from robust.models.timm_models import TimmConfig, build_timm, export_timm, load_exported
from robust.pixmix import PixMixConfig, load_mixing_set, pixmix, sample_mixing

STAGE = "timm-teacher"  # the cache stage; "teacher" held the export format before timm's folders
AUGMENTATIONS = ("augmix", "deepaugment", "pixmix")


@dataclass
class RobustTeacherConfig:
    """A small timm teacher and the ``augmentations`` of the module docstring (the JSD weight is
    ``augmix.jsd_weight``), whatever trains it: the student pool, or ``train_robust_teacher``."""

    # timm's 0.37M-parameter test ResNet: on 32 px digits it beat test_byobnet at equal epochs, and
    # resnet10t costs ~7x more per step; 12 epochs of AugMix alone take ~80 s on one CPU thread
    # (~99.8% clean accuracy)
    model: TimmConfig = field(default_factory=lambda: TimmConfig(name="test_resnet", num_classes=10))
    augmentations: list[str] = field(default_factory=lambda: ["augmix", "deepaugment"])
    augmix: AugMixConfig = field(default_factory=AugMixConfig)
    deepaugment: DeepAugConfig = field(default_factory=DeepAugConfig)
    pixmix: PixMixConfig = field(default_factory=PixMixConfig)


@dataclass
class TeacherTrainConfig(RobustTeacherConfig):
    """``RobustTeacherConfig`` plus the settings of the single-process loop ``train_robust_teacher``."""

    epochs: int = 12
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    seed: int = 0
    threads: int = 1  # torch intra-op threads; the augmentations run in this same thread anyway


def check_augmentations(cfg: RobustTeacherConfig) -> None:
    """ValueError for an unknown or repeated name in ``cfg.augmentations``."""
    unknown = sorted(set(cfg.augmentations) - set(AUGMENTATIONS))
    if unknown or len(set(cfg.augmentations)) != len(cfg.augmentations):
        raise ValueError(f"augmentations {list(cfg.augmentations)}: pick each at most once from {list(AUGMENTATIONS)}")


def teacher_batch(images_NHWC: np.ndarray, labels_N: np.ndarray, cfg: RobustTeacherConfig, *,
                  mixing_M3HW: Tensor | None = None, generator: torch.Generator) -> dict[str, Tensor]:
    """The model input for a uint8 (N, H, W, 3) batch: ``{"image": float in [0, 1], (3N, 3, H, W)
    split-major with augmix else (N, 3, H, W); "label": int64 (N,)}``.

    PixMix draws from ``generator`` and needs ``mixing_M3HW`` (``load_mixing_set(cfg.pixmix.mixing,
    size=(H, W))``); AugMix (timm) draws from Python's and numpy's global RNGs.
    """
    x_NHWC = images_NHWC
    if "pixmix" in cfg.augmentations:
        if mixing_M3HW is None:
            raise ValueError("pixmix needs mixing pictures: pass mixing_M3HW=load_mixing_set(cfg.pixmix.mixing, ...)")
        x_BCHW = torch.from_numpy(np.ascontiguousarray(x_NHWC)).permute(0, 3, 1, 2)
        mixing = sample_mixing(mixing_M3HW, len(x_BCHW), generator=generator)
        x_NHWC = pixmix(x_BCHW, mixing, cfg.pixmix, generator=generator).permute(0, 2, 3, 1).numpy()
    if "augmix" in cfg.augmentations:
        image = augmix_batch(x_NHWC, augmix_transform(cfg.augmix))  # [clean; augmix1; augmix2]
    else:
        image = torch.from_numpy(np.ascontiguousarray(x_NHWC)).permute(0, 3, 1, 2).float().div(255)
    return {"image": image, "label": torch.as_tensor(labels_N, dtype=torch.long)}


def robust_teacher_loss(model: nn.Module, batch: dict[str, Tensor], cfg: RobustTeacherConfig) -> Tensor:
    """The training loss on one ``teacher_batch``: CE + JSD consistency with augmix, else CE."""
    logits = model(batch["image"])
    if "augmix" in cfg.augmentations:
        return jsd_loss_fn(cfg.augmix)(logits, batch["label"])
    return F.cross_entropy(logits, batch["label"])


def teacher_training_set(x_train_NHWC: np.ndarray, y_train: np.ndarray, cfg: TeacherTrainConfig, *,
                         progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The training images and labels: the originals, then their DeepAugment copies when selected
    (the autoencoder from ``deepaugment.checkpoint`` or trained on these images first)."""
    if "deepaugment" not in cfg.augmentations:
        return x_train_NHWC, y_train
    net = autoencoder_for(torch.from_numpy(x_train_NHWC).permute(0, 3, 1, 2), cfg.deepaugment, progress=progress)
    x_da, y_da = deepaugment_dataset(x_train_NHWC, y_train, net, cfg.deepaugment, seed=cfg.seed)
    return np.concatenate([x_train_NHWC, x_da]), np.concatenate([y_train, y_da])


def train_robust_teacher(
    x_train_NHWC: np.ndarray, y_train: np.ndarray, cfg: TeacherTrainConfig, *, progress: bool = True
) -> nn.Module:
    """Train ``cfg.model`` on uint8 (N, H, W, 3) images with ``cfg.augmentations``; return it in eval mode.

    Deterministic given ``cfg.seed`` (timm's AugMix draws from Python's and numpy's global RNGs, so
    those are seeded too).
    """
    check_augmentations(cfg)
    if cfg.epochs < 0:
        raise ValueError(f"epochs must be >= 0 (0 returns the seeded initialisation), got {cfg.epochs}")
    if len(x_train_NHWC) != len(y_train) or len(y_train) < cfg.batch_size:
        raise ValueError(
            f"need as many labels as images and at least batch_size={cfg.batch_size} of them, "
            f"got {len(x_train_NHWC)} images and {len(y_train)} labels"
        )
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        x, y = teacher_training_set(x_train_NHWC, y_train, cfg, progress=progress)
        mixing = load_mixing_set(cfg.pixmix.mixing, size=x.shape[1:3]) if "pixmix" in cfg.augmentations else None
        return _train(build_timm(cfg.model).train(), x, y, cfg, mixing, progress=progress).eval()
    finally:
        torch.set_num_threads(threads_before)


def _train(model: nn.Module, x_NHWC: np.ndarray, y_N: np.ndarray, cfg: TeacherTrainConfig,
           mixing_M3HW: Tensor | None, *, progress: bool) -> nn.Module:
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(y_N) // cfg.batch_size  # drop the last partial batch: BN sees full batches
    total_steps = cfg.epochs * steps_per_epoch
    step = 0
    bar = tqdm(total=total_steps, desc=f"train {cfg.model.name}", disable=not progress)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(y_N)).numpy()
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            batch = teacher_batch(x_NHWC[idx], y_N[idx], cfg, mixing_M3HW=mixing_M3HW, generator=generator)
            loss = robust_teacher_loss(model, batch, cfg)
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
    return model


def cached_teacher(cache_dir: str | Path, cfg: TeacherTrainConfig, *, progress: bool = True) -> tuple[nn.Module, Path]:
    """The frozen teacher for ``cfg`` and its directory ``cache_dir/timm-teacher-<config hash>``: loaded if
    cached, else trained on the digits train split and exported there as a timm folder (``export_timm``;
    preprocessing: the digits' size, no crop, as they are evaluated)."""
    check_augmentations(cfg)

    def build(out: Path) -> None:
        x_train, y_train, _, _ = digits_arrays()
        evaluated = timm_data_config(EvalSetConfig(image_size=x_train.shape[1], crop_pct=1.0))
        export_timm(train_robust_teacher(x_train, y_train, cfg, progress=progress), cfg.model, out,
                    data_config=evaluated)  # fmt: skip

    out = cached_stage(cache_dir, STAGE, cfg, build)
    return load_exported(out).eval().requires_grad_(False), out


def teacher_cache_dir(cache_dir: str | Path, cfg: TeacherTrainConfig) -> Path:
    """Where ``cached_teacher`` keeps the teacher of ``cfg``."""
    return cache_dir_for(cache_dir, STAGE, cfg)
