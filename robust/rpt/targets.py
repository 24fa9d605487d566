"""What RPT's data side computes (seed 002, sec. 4.3): which augmented samples an epoch trains on, the
augmented ("unclean") AugMix view of an image, and per batch the teachers' logits (eq. 3: a frozen copy of
the initial large model, the timm model or in the zero-shot setting the initial open_clip zero-shot
classifier, on the clean samples; eq. 4: the small robust teacher on the augmented ones) and optionally the
frozen backbone M_b's features (the feature cache).
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
from robust.seeding import combine, seed_everything


def initial_teacher(cfg: PartialConfig, *, device: torch.device | str = "cpu") -> nn.Module:
    """The clean-head teacher: the large model before tuning, frozen, taking [0, 1] images."""
    if cfg.source == "open_clip":  # zero-shot: the initial CLIP classifier over the class prompts
        return build_clip_teacher(cfg.clip, device=device)
    if cfg.source == "timm":
        return build_timm(cfg.timm).to(device).requires_grad_(False).eval()
    raise ValueError(f"large.source={cfg.source!r} is unknown; use 'timm' or 'open_clip'")


_DRAW = 2  # salts a sample's seed for its draw, apart from the augmentations it seeds


def draw_augmented(seeds_B: np.ndarray, *, fraction: float) -> np.ndarray:
    """Which augmented candidates an epoch trains on: each with probability ``fraction`` (a, appendix A.3),
    drawn from its seed (``robust.seeding.sample_seeds`` of run seed, epoch, key) alone."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"the augmented fraction must lie in [0, 1], got {fraction}")
    return np.array([combine([int(s), _DRAW]) < fraction * 2**63 for s in seeds_B], dtype=bool)


def augmented_view(image_HWC: np.ndarray, augmix: AugMixAugment, *, seed: int) -> np.ndarray:
    """The AugMix view of one uint8 image (timm's AugMix draws from the global generators, seeded here)."""
    seed_everything(seed)
    return np.asarray(augmix(Image.fromarray(image_HWC)))


def rpt_targets(initial: nn.Module, robust: nn.Module, x01_BCHW: Tensor, *, augmented_B: Tensor, precision: str,
                backbone: nn.Module | None = None) -> dict[str, Tensor]:
    """The teachers' logits under ``precision``: the initial model on the clean rows (eq. 3; zeros on the
    augmented rows, which eq. 4 distils from the robust teacher, so the large model's costly forward is
    skipped there), the robust teacher on every row (Only-KD distils clean samples from it too); with
    ``backbone``, M_b's features of every row (fp32: the tuned part trains on them)."""
    robust_logits = teacher_logits(robust, x01_BCHW, precision=precision)
    init_logits = torch.zeros_like(robust_logits)
    clean = ~augmented_B.bool().to(x01_BCHW.device)
    if clean.any():
        init_logits[clean] = teacher_logits(initial, x01_BCHW[clean], precision=precision)
    out = {"teacher_logits": init_logits, "robust_logits": robust_logits}
    if backbone is not None:
        with torch.no_grad():
            out["feats"] = backbone(x01_BCHW)
    return out
