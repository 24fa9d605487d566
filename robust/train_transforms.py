"""The student's training augmentation, built from timm's own implementations (the DeiT recipe of DAD's
ViT-B/16 result, SPEC section 4): per sample a random resized crop, flip, RandAugment / colour jitter and
random erasing (``timm.data.create_transform``), per batch mixup / CutMix with label smoothing
(``timm.data.Mixup``).

Images stay in [0, 1] (mean 0, std 1, as the official DAD student), and every stage ends on the uint8
grid: the teacher must score exactly the pixels the student will see. Randomness comes from the seeds
given (``robust.seeding``), never from the process, so a sample's augmentation is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup, create_transform
from timm.data.auto_augment import RandAugment
from timm.data.mixup import mixup_target

from robust.seeding import seed_everything


@dataclass
class TrainAugConfig:
    """Defaults: the DeiT recipe of the official DAD ViT-B/16 run (timm's train.py arguments in brackets)."""

    crop_size: int = 224
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    interpolation: str = "bicubic"
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # [--aa]; "" turns it off (then color_jitter applies)
    color_jitter: float = 0.4  # [--color-jitter]; timm disables it under RandAugment, as DeiT does
    re_prob: float = 0.25  # [--reprob] random erasing, mode "pixel" (per-pixel normal noise) [--remode]
    mixup: float = 0.8  # [--mixup] Beta(alpha, alpha); 0 turns it off
    cutmix: float = 1.0  # [--cutmix]
    mix_prob: float = 1.0  # [--mixup-prob]
    switch_prob: float = 0.5  # [--mixup-switch-prob] CutMix instead of mixup for a batch
    label_smoothing: float = 0.1  # [--smoothing]: part of the soft targets (mixup's, or a smoothed one-hot)

    @property
    def soft_targets(self) -> bool:
        """Whether the batches carry soft targets (B, K) instead of hard labels."""
        return self.mixup > 0 or self.cutmix > 0 or self.label_smoothing > 0


def check_train_aug(cfg: TrainAugConfig) -> None:
    if cfg.crop_size < 1:
        raise ValueError(f"augment.crop_size must be >= 1, got {cfg.crop_size}")
    if not (0 < cfg.scale[0] <= cfg.scale[1] <= 1 and 0 < cfg.ratio[0] <= cfg.ratio[1]):
        raise ValueError(f"augment.scale {cfg.scale} must be 0 < lo <= hi <= 1 and augment.ratio {cfg.ratio} 0 < lo <= hi")
    for name in ("hflip", "re_prob", "mix_prob", "switch_prob"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"augment.{name} must lie in [0, 1], got {getattr(cfg, name)}")
    if cfg.mixup < 0 or cfg.cutmix < 0 or not 0 <= cfg.label_smoothing < 1:
        raise ValueError("augment.mixup and augment.cutmix must be >= 0 and augment.label_smoothing in [0, 1)")


# Pillow >= 11 refuses posterize with 0 bits, which timm's PosterizeIncreasing asks for at magnitude 10
# (rand-m9-mstd0.5 reaches it), so an epoch would crash. Capping the magnitudes just below 10 keeps 1 bit
# there (older Pillow blacked the image out) and moves every other op by less than 0.01%.
RANDAUGMENT_MAX_MAGNITUDE = 9.999


def sample_transform(cfg: TrainAugConfig) -> Callable[[Image.Image], torch.Tensor]:
    """timm's training transform: PIL RGB -> float (3, crop, crop) in [0, 1] before clipping (random
    erasing's noise may leave [0, 1]; ``augment_image`` clips it on the uint8 grid)."""
    check_train_aug(cfg)
    transform = create_transform(
        cfg.crop_size, is_training=True, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip,
        color_jitter=cfg.color_jitter or None, auto_augment=cfg.auto_augment or None, interpolation=cfg.interpolation,
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), re_prob=cfg.re_prob, re_mode="pixel")
    for step in transform.transforms:
        if isinstance(step, RandAugment):
            for op in step.ops:
                op.magnitude_max = min(op.magnitude_max or RANDAUGMENT_MAX_MAGNITUDE, RANDAUGMENT_MAX_MAGNITUDE)
    return transform


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> the nearest uint8 levels (values outside [0, 1] clip)."""
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def augment_image(image_HWC: np.ndarray, transform: Callable[[Image.Image], torch.Tensor], *, seed: int) -> np.ndarray:
    """One uint8 RGB image -> its augmented uint8 (crop, crop, 3), drawn from ``seed`` only."""
    seed_everything(seed)  # timm's transforms draw from Python's, numpy's and torch's global generators
    return to_uint8(transform(Image.fromarray(image_HWC))).permute(1, 2, 0).numpy()


def mix_batch(
    images_BHWC: np.ndarray, labels_B: np.ndarray, cfg: TrainAugConfig, *, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mixup / CutMix (timm, "batch" mode: one lambda per batch, sample i with sample B-1-i) and label
    smoothing: (uint8 images, float32 soft targets (B, K) that sum to 1). With an odd batch the last
    sample stays unmixed (timm's Mixup needs pairs); without mixing the targets are smoothed one-hots."""
    y_B = torch.as_tensor(labels_B, dtype=torch.long)
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return images_BHWC, mixup_target(y_B, num_classes, smoothing=cfg.label_smoothing).numpy()
    seed_everything(seed)  # timm's Mixup draws lambda and the CutMix box from numpy's global generator
    mixer = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob, switch_prob=cfg.switch_prob,
                  mode="batch", label_smoothing=cfg.label_smoothing, num_classes=num_classes)
    x_BCHW = torch.from_numpy(np.ascontiguousarray(images_BHWC)).permute(0, 3, 1, 2).float().div_(255)
    targets_BK = mixup_target(y_B, num_classes, smoothing=cfg.label_smoothing)
    even = len(y_B) - len(y_B) % 2
    if even:
        x_BCHW[:even], targets_BK[:even] = mixer(x_BCHW[:even], y_B[:even])
    return to_uint8(x_BCHW).permute(0, 2, 3, 1).numpy(), targets_BK.float().numpy()
