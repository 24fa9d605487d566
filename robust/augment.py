"""AugMix + Jensen-Shannon consistency for the robust teacher (Hendrycks et al. 2020; SPEC 6), via timm.

A training batch for ``JsdCrossEntropy`` is split-major: ``[clean_B; augmix1_B; augmix2_B]``.
The op list (``augment_ops``) and the uint8 / [0, 1] batch helpers are shared with PixMix and DeepAugment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import AugMixAugment, AugmentOp, augmix_ops
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
    if cfg.width < 1 or cfg.depth == 0 or cfg.depth < -1:
        raise ValueError("AugMix needs width >= 1, depth -1 (random 1-3) or >= 1")
    ops = augment_ops(cfg.severity, all_ops=cfg.all_ops)
    return AugMixAugment(ops, alpha=cfg.alpha, width=cfg.width, depth=cfg.depth)


def augment_ops(severity: int, *, all_ops: bool) -> list[AugmentOp]:
    """timm's AugMix PIL ops (shared by AugMix and PixMix), magnitudes uniform in [0, severity] of 10.

    Each call of an op draws its magnitude, sign and resampling filter from Python's ``random``.
    """
    if not 0 <= severity <= 10:
        raise ValueError(f"augmentation severity must be in [0, 10], got {severity}")
    hparams = dict(translate_pct=0.3, img_mean=(128, 128, 128), magnitude_std=float("inf"))
    names = list(_ALL_OPS if all_ops else _PAPER_OPS)
    return augmix_ops(magnitude=severity, hparams=hparams, transforms=names)


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


def as_unit_float(x_BCHW: Tensor) -> Tensor:
    """A uint8 batch as float32 in [0, 1]; a floating batch (already in [0, 1]) as it is."""
    if x_BCHW.ndim != 4 or x_BCHW.shape[1] != 3:
        raise ValueError(f"expected an RGB batch (B, 3, H, W), got shape {tuple(x_BCHW.shape)}")
    if x_BCHW.dtype == torch.uint8:
        return x_BCHW.float().div(255)
    if not x_BCHW.is_floating_point():
        raise ValueError(f"expected uint8 or floating images in [0, 1], got {x_BCHW.dtype}")
    return x_BCHW


def to_dtype_of(y_BCHW: Tensor, like: Tensor) -> Tensor:
    """``y`` (float in [0, 1]) back in ``like``'s dtype; for uint8, rounded to the nearest level."""
    if like.dtype == torch.uint8:
        return y_BCHW.mul(255).round().clamp(0, 255).to(torch.uint8)
    return y_BCHW.to(like.dtype)
