"""What the teacher side of distillation computes for a batch (SPEC section 4): the frozen teacher's
logits on the student's pixels and, for DAD, the discrete adversarial samples and the teacher's logits on
them. The teacher pool runs this per batch; it is a pure function of (models, images, targets, seed).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from robust.attacks.dad import DADConfig, dad_samples
from robust.models.clip_teacher import ClipTeacherConfig, build_clip_teacher
from robust.models.precision import check_precision, teacher_logits
from robust.models.timm_models import TimmConfig, build_timm
from robust.models.vqgan import VQGAN, discretize
from robust.train_transforms import to_uint8


@dataclass
class TeacherConfig:
    """The frozen teacher: CLIP zero-shot (open_clip) or any timm classifier."""

    kind: str = "clip"  # "clip" | "timm"
    clip: ClipTeacherConfig = field(default_factory=ClipTeacherConfig)
    timm: TimmConfig = field(default_factory=lambda: TimmConfig(name="resnet50", num_classes=1000))
    # the teacher forward, the attack and the VQGAN round trips: "auto" = bf16 on GPU, fp32 on CPU
    precision: str = "auto"

    @property
    def num_classes(self) -> int:
        return (len(self.clip.class_names) or 1000) if self.kind == "clip" else self.timm.num_classes


def build_teacher(cfg: TeacherConfig, *, device: torch.device) -> nn.Module:
    check_precision(cfg.precision)
    if cfg.kind == "clip":
        return build_clip_teacher(cfg.clip, device=device)
    if cfg.kind == "timm":
        return build_timm(cfg.timm).to(device).requires_grad_(False).eval()
    raise ValueError(f"teacher.kind must be 'clip' or 'timm', got {cfg.kind!r}")


def on_uint8_grid(x01_BCHW: Tensor) -> Tensor:
    """The images as the student will see them: rounded to uint8 levels, back in [0, 1]."""
    return to_uint8(x01_BCHW).float().div_(255)


def teacher_targets(
    teacher: nn.Module,
    x01_BCHW: Tensor,
    y: Tensor,
    *,
    precision: str,
    vqgan: VQGAN | None = None,
    dad: DADConfig | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """``{"teacher_logits"}`` on ``x`` (already on the uint8 grid) and, with a VQGAN, ``{"dad_image",
    "dad_teacher_logits"}``: x_dad = Q(PGD(Q(x))) against ``y`` (hard labels (B,) or soft targets
    (B, K)), rounded to uint8 levels before the teacher scores it, so its logits belong to the exact pixels.
    Everything runs under ``precision`` (``robust.models.precision``)."""
    out = {"teacher_logits": teacher_logits(teacher, x01_BCHW, precision=precision)}
    if vqgan is not None:
        if dad is None:
            raise ValueError("DAD samples need a DADConfig")
        q = functools.partial(discretize, vqgan, precision=precision)
        x_dad = on_uint8_grid(dad_samples(teacher, q, x01_BCHW, y, dad, generator=generator, precision=precision))
        out |= {"dad_image": x_dad, "dad_teacher_logits": teacher_logits(teacher, x_dad, precision=precision)}
    return out
