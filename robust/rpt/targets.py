"""What RPT's teacher side computes per batch (seed 002, eq. 3-4): the augmented ("unclean") view of each
image, the clean-head teacher's logits on the image (a frozen copy of the initial large model: the timm
model, or in the zero-shot setting the initial open_clip zero-shot classifier), the small robust
teacher's logits on the view, and optionally the frozen backbone M_b's features of both (the feature cache).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import AugMixAugment
from torch import Tensor, nn

from robust.models.clip_teacher import build_clip_teacher
from robust.models.precision import teacher_logits
from robust.models.timm_models import build_timm
from robust.rpt.partial import PartialConfig
from robust.seeding import seed_everything


def initial_teacher(cfg: PartialConfig, *, device: torch.device | str = "cpu") -> nn.Module:
    """The clean-head teacher: the large model before tuning, frozen, taking [0, 1] images."""
    if cfg.source == "open_clip":  # zero-shot: the initial CLIP classifier over the class prompts
        return build_clip_teacher(cfg.clip, device=device)
    if cfg.source == "timm":
        return build_timm(cfg.timm).to(device).requires_grad_(False).eval()
    raise ValueError(f"large.source={cfg.source!r} is unknown; use 'timm' or 'open_clip'")


def augmented_view(image_HWC: np.ndarray, augmix: AugMixAugment, *, seed: int) -> np.ndarray:
    """The AugMix view of one uint8 image (timm's AugMix draws from the global generators, seeded here)."""
    seed_everything(seed)
    return np.asarray(augmix(Image.fromarray(image_HWC)))


def rpt_targets(initial: nn.Module, robust: nn.Module, x01_BCHW: Tensor, x01_aug_BCHW: Tensor, *,
                precision: str, backbone: nn.Module | None = None) -> dict[str, Tensor]:
    """The teachers' logits (eq. 3: initial model on the clean image; eq. 4: robust teacher on the view)
    under ``precision``, and, with ``backbone``, M_b's features of both (fp32: the tuned part trains on them)."""
    out = {"teacher_logits": teacher_logits(initial, x01_BCHW, precision=precision),
           "aug_teacher_logits": teacher_logits(robust, x01_aug_BCHW, precision=precision)}
    if backbone is not None:
        with torch.no_grad():
            out |= {"feats": backbone(x01_BCHW), "aug_feats": backbone(x01_aug_BCHW)}
    return out
