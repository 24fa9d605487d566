"""What the student pool trains: each task builds its module, computes a micro-batch's loss from the
pool's batch (numpy rows, corrupt samples already removed) and exports the result.

The student pool (``cluster.student_pool``) owns DeepSpeed, checkpoints and the data stream; a task
is a thin shell over ``robust/`` functions, so one trainer serves the DAD students, RPT's tunable
part and the robust teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from robust.losses.objectives import ObjectiveConfig, objective
from robust.models.timm_models import TimmConfig, build_timm, export_timm
from robust.pixmix import load_mixing_set
from robust.rpt.baselines import METHODS, build_method, method_loss_config
from robust.rpt.export import export_rpt
from robust.rpt.losses import RptLossConfig, rpt_loss
from robust.rpt.partial import PartialConfig
from robust.rpt.select import SelectConfig
from robust.teacher_train import TeacherTrainConfig, check_augmentations, robust_teacher_loss, teacher_batch

Forward = Callable[[Tensor], Tensor | dict[str, Tensor]]  # the DeepSpeed engine's forward (dtype handled)
Terms = dict[str, Tensor]  # batch-mean loss terms for metrics.jsonl


class StudentTask(Protocol):
    def build(self) -> nn.Module:
        """The module DeepSpeed trains (its parameters with requires_grad reach the optimizer)."""

    def loss(self, forward: Forward, rows: dict[str, np.ndarray], *, device: torch.device) -> tuple[Tensor, Terms]:
        """The micro-batch's loss through ``forward`` (the engine), and its terms."""

    def export(self, module: nn.Module, out_dir: str | Path, *, stem: str) -> None:
        """Write the trained ``module`` (full weights, gathered on rank 0) for evaluation."""


def images(x_BHWC: np.ndarray, device: torch.device) -> Tensor:
    """uint8 HWC images from the stream -> float [0, 1] BCHW on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(x_BHWC)).to(device).permute(0, 3, 1, 2).float().div_(255)


def column(rows: dict[str, np.ndarray], name: str, device: torch.device) -> Tensor | None:
    return torch.as_tensor(rows[name], device=device) if name in rows else None


@dataclass
class DistillTask:
    """A timm student trained with a robust.losses.objectives objective (CE, KD, DAD online/offline)."""

    student: TimmConfig
    objective: ObjectiveConfig

    def build(self) -> nn.Module:
        return build_timm(self.student)

    def loss(self, forward: Forward, rows: dict[str, np.ndarray], *, device: torch.device) -> tuple[Tensor, Terms]:
        x = images(rows["image"], device)
        y = column(rows, "label", device)
        has_adv = "dad_image" in rows
        s_all = forward(torch.cat([x, images(rows["dad_image"], device)]) if has_adv else x).float()
        s, s_adv = (s_all[: len(x)], s_all[len(x):]) if has_adv else (s_all, None)
        return objective(self.objective, student_logits=s, y=y, teacher_logits=column(rows, "teacher_logits", device),
                         student_adv_logits=s_adv, teacher_adv_logits=column(rows, "dad_teacher_logits", device))

    def export(self, module: nn.Module, out_dir: str | Path, *, stem: str) -> None:
        export_timm(module, self.student, out_dir, stem=stem)


@dataclass
class RptTask:
    """RPT or one of its baselines (robust.rpt.baselines.METHODS): DeepSpeed trains the tuned part and
    the heads; the frozen backbone M_b runs outside the engine (no optimizer state), or not at all when
    the batches carry its cached features."""

    method: str
    partial: PartialConfig
    loss_cfg: RptLossConfig
    select: SelectConfig  # eq. 6 at test time, recorded in the export

    def build(self) -> nn.Module:
        self._student = build_method(self.method, self.partial)
        return self._student.tuned

    def loss(self, forward: Forward, rows: dict[str, np.ndarray], *, device: torch.device) -> tuple[Tensor, Terms]:
        views = 2 if METHODS[self.method].augmented else 1  # linear probe, full FT and VPT: clean only
        if "feats" in rows:
            feats_B = torch.cat([torch.from_numpy(rows["feats"]), torch.from_numpy(rows["aug_feats"])][:views])
            feats_B = feats_B.to(device)
        else:  # M_b in eval mode without autograd (robust.rpt.partial.FrozenBackbone)
            backbone = self._student.backbone.to(device)
            feats_B = backbone(torch.cat([images(rows["image"], device), images(rows["aug_image"], device)][:views]))
        logits = {head: s.float() for head, s in forward(feats_B).items()}
        n = len(rows["label"])
        y = column(rows, "label", device).repeat(views)
        init, robust = column(rows, "init_logits", device).float(), column(rows, "robust_logits", device).float()
        # each teacher's rows are the samples it teaches (eq. 3: clean, eq. 4: augmented); the rest are unread
        loss, sums = rpt_loss(logits, y, is_aug_B=torch.arange(n * views, device=device) >= n,
                              t_init_logits=torch.cat([init, torch.zeros_like(init)])[: n * views],
                              t_robust_logits=torch.cat([torch.zeros_like(robust), robust])[: n * views],
                              cfg=method_loss_config(self.method, self.loss_cfg))
        return loss, {k: v / sums["n"] for k, v in sums.items() if k != "n" and not k.startswith("n_")}

    def export(self, module: nn.Module, out_dir: str | Path, *, stem: str) -> None:
        assert module is self._student.tuned
        export_rpt(self._student, out_dir, stem=stem, method=self.method, cfg=self.partial, select=self.select)


@dataclass
class RobustTeacherTask:
    """The small robust teacher (SPEC 6): a timm model on AugMix (+ JSD) / PixMix views made on the worker
    (``robust.teacher_train.teacher_batch``); DeepAugment copies arrive as extra samples in the stream."""

    train: TeacherTrainConfig  # model, augmentations and their configs (its loop settings are unused here)
    seed: int = 0

    def build(self) -> nn.Module:
        check_augmentations(self.train)
        self._generator = torch.Generator().manual_seed(self.seed + torch.initial_seed())  # per rank
        self._mixing = None
        return build_timm(self.train.model)

    def loss(self, forward: Forward, rows: dict[str, np.ndarray], *, device: torch.device) -> tuple[Tensor, Terms]:
        x_NHWC = np.ascontiguousarray(rows["image"])
        if "pixmix" in self.train.augmentations and self._mixing is None:  # the bank, once, at the data's size
            self._mixing = load_mixing_set(self.train.pixmix.mixing, size=x_NHWC.shape[1:3])
        batch = teacher_batch(x_NHWC, rows["label"], self.train, mixing_M3HW=self._mixing, generator=self._generator)
        loss = robust_teacher_loss(lambda x: forward(x.to(device)).float(), {**batch, "label": batch["label"].to(device)},
                                   self.train)
        return loss, {"loss": loss.detach()}

    def export(self, module: nn.Module, out_dir: str | Path, *, stem: str) -> None:
        export_timm(module, self.train.model, out_dir, stem=stem)
