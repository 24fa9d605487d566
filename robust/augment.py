"""AugMix + Jensen-Shannon consistency for the robust teacher (Hendrycks et al. 2020; SPEC 6), via timm.

A training batch for ``JsdCrossEntropy`` is split-major: ``[clean_B; augmix1_B; augmix2_B]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import AugMixAugment, augmix_ops
from timm.loss import JsdCrossEntropy
from torch import Tensor
from torchvision.transforms.functional import to_tensor

NUM_SPLITS = 3  # the clean image and two AugMix views

# timm's AugMix op list (its order, so seeded draws match timm's own augment_and_mix_transform);
# the AugMix paper leaves the four colour/sharpness ops out unless all_ops is set, because they
# overlap with the ImageNet-C corruptions.
_ALL_OPS_ONLY = ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing")
_ALL_OPS = (
    "AutoContrast", *_ALL_OPS_ONLY, "Equalize", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
_PAPER_OPS = tuple(op for op in _ALL_OPS if op not in _ALL_OPS_ONLY)


@dataclass
class AugMixConfig:
    """AugMix parameters, named as in timm's ``augmix-m{severity}-w{width}-d{depth}-a{alpha}``.

    ``depth=-1`` draws each chain's depth from {1, 2, 3}; ``alpha`` sets both the Dirichlet chain
    weights and the Beta skip mix. ``jsd_weight`` is the JSD loss weight (12 in the paper).
    """

    severity: int = 3
    width: int = 3
    depth: int = -1
    alpha: float = 1.0
    all_ops: bool = False
    jsd_weight: float = 12.0
    label_smoothing: float = 0.0


def augmix_transform(cfg: AugMixConfig) -> AugMixAugment:
    """timm's AugMix PIL transform, built as ``timm.data.create_transform`` builds it.

    Op magnitudes are drawn uniformly in [0, severity] per op (timm's default for AugMix).
    """
    if cfg.width < 1 or cfg.depth == 0 or cfg.depth < -1 or not 0 <= cfg.severity <= 10:
        raise ValueError("AugMix needs width >= 1, depth -1 (random 1-3) or >= 1, severity in [0, 10]")
    hparams = dict(translate_pct=0.3, img_mean=(128, 128, 128), magnitude_std=float("inf"))
    names = list(_ALL_OPS if cfg.all_ops else _PAPER_OPS)
    ops = augmix_ops(magnitude=cfg.severity, hparams=hparams, transforms=names)
    return AugMixAugment(ops, alpha=cfg.alpha, width=cfg.width, depth=cfg.depth)


def _as_pil(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    return Image.fromarray(image)


def augmix_views(image: Image.Image | np.ndarray, transform: AugMixAugment) -> Tensor:
    """The clean image and two independent AugMix views of it, as a (3, C, H, W) float tensor in [0, 1].

    ``transform`` comes from ``augmix_transform``; it draws from numpy's and Python's global RNGs.
    """
    pil = _as_pil(image)
    return torch.stack([to_tensor(pil), to_tensor(transform(pil)), to_tensor(transform(pil))])


def augmix_batch(images_NHWC: np.ndarray, transform: AugMixAugment) -> Tensor:
    """A uint8 (N, H, W, 3) batch as the split-major (3N, 3, H, W) JSD batch ``[clean; view1; view2]``."""
    if images_NHWC.ndim != 4:
        raise ValueError(f"expected a uint8 batch (N, H, W, 3), got shape {images_NHWC.shape}")
    views_N3CHW = torch.stack([augmix_views(image, transform) for image in images_NHWC])
    return views_N3CHW.transpose(0, 1).flatten(0, 1)


def jsd_loss_fn(cfg: AugMixConfig) -> JsdCrossEntropy:
    """timm's CE(clean) + jsd_weight * JS(p_clean, p_aug1, p_aug2); call it on the split-major batch
    logits (3N, K) with the N labels (or the 3N repeated)."""
    return JsdCrossEntropy(num_splits=NUM_SPLITS, alpha=cfg.jsd_weight, smoothing=cfg.label_smoothing)
