"""What a trainer step computes: each task builds its module, computes a micro-batch's loss from the
stream's batch (numpy columns of the batch schema, placeholder rows already removed) and exports the
result. The trainer (``cluster.engine.trainer``) owns DeepSpeed, checkpoints and the stream; a task is a
thin shell over ``robust/`` functions, so one trainer serves the DAD students, RPT's tuned part and the
robust teacher.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from cluster.engine import batch as B
from robust.attacks.dad import DADConfig, dad_samples
from robust.losses.objectives import ObjectiveConfig, objective
from robust.losses.soft_targets import dense_log_probs
from robust.models.timm_models import TimmConfig, build_timm, export_timm
from robust.models.vqgan import VQGANConfig, build_vqgan, discretize
from robust.pixmix import load_mixing_set
from robust.rpt.baselines import METHODS, build_method, method_loss_config
from robust.rpt.export import export_rpt
from robust.rpt.losses import RptLossConfig, rpt_loss
from robust.rpt.partial import PartialConfig
from robust.rpt.select import SelectConfig
from robust.seeding import combine, generator, seed_everything
from robust.teacher_train import RobustTeacherConfig, check_augmentations, robust_teacher_loss, teacher_batch

Forward = Callable[[Tensor], Tensor | dict[str, Tensor]]  # the DeepSpeed engine's forward (dtype handled)
Terms = dict[str, Tensor]  # batch-mean loss terms for metrics.jsonl


class StudentTask(Protocol):
    needs: tuple[str, ...]  # the batch columns the loss reads

    def build(self) -> nn.Module:
        """The module DeepSpeed trains (its parameters with requires_grad reach the optimizer)."""

    def loss(self, forward: Forward, rows: dict[str, np.ndarray], *, device: torch.device) -> tuple[Tensor, Terms]:
        """The micro-batch's loss through ``forward`` (the engine), and its terms."""

    def export(self, module: nn.Module, out_dir: str | Path) -> None:
        """Write the trained ``module`` (the latest ``build()``, holding the full trained weights) for evaluation."""


OBJECTIVE_NEEDS = {"ce": (), "kd": (B.TEACHER_LOGITS,), "dat": (),
                   "dad_online": (B.TEACHER_LOGITS, B.DAD_IMAGE, B.DAD_TEACHER_LOGITS),
                   "dad_offline": (B.TEACHER_LOGITS, B.DAD_IMAGE, B.DAD_TEACHER_LOGITS)}


@dataclass
class DistillTask:
    """A timm student trained with one of robust.losses.objectives' losses (CE, KD, DAD online/offline)."""

    student: TimmConfig
    kind: str
    objective: ObjectiveConfig
    data_config: dict = field(default_factory=dict)  # the export's preprocessing (robust.eval.sets.timm_data_config)
    topk_targets: bool = False  # the batches carry the teacher's top-k (batch.TOPK) instead of its logits
    needs: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVE_NEEDS:
            raise ValueError(f"objective kind {self.kind!r} is unknown; use one of {sorted(OBJECTIVE_NEEDS)}")
        needs = OBJECTIVE_NEEDS[self.kind]
        self.needs = (B.IMAGE, *(B.compact(needs) if self.topk_targets else needs))

    def build(self) -> nn.Module:
        return build_timm(self.student)

    def loss(self, forward: Forward, rows: dict[str, np.ndarray], *, device: torch.device) -> tuple[Tensor, Terms]:
        x = B.images(rows[B.IMAGE], device)
        has_adv = B.DAD_IMAGE in self.needs
        s_all = forward(torch.cat([x, B.images(rows[B.DAD_IMAGE], device)]) if has_adv else x).float()
        s, s_adv = (s_all[: len(x)], s_all[len(x):]) if has_adv else (s_all, None)
        logits = {name: self._teacher(rows, col, device=device, num_classes=s.shape[1]) for name, col in
                  (("teacher_logits", B.TEACHER_LOGITS), ("teacher_adv_logits", B.DAD_TEACHER_LOGITS))
                  if col in OBJECTIVE_NEEDS[self.kind]}
        return objective(self.kind, self.objective, student_logits=s, y=B.targets(rows, device), student_adv_logits=s_adv, **logits)

    def _teacher(self, rows: dict[str, np.ndarray], column: str, *, device: torch.device, num_classes: int) -> Tensor:
        """The teacher's logits ``column``, or its top-k expanded to log-probabilities: valid logits for the KD
        losses (softmax(log p) = p; robust.losses.soft_targets)."""
        if not self.topk_targets:
            return B.tensor(rows, column, device)
        index, logp = B.TOPK[column]
        return dense_log_probs(B.tensor(rows, index, device), B.tensor(rows, logp, device), num_classes=num_classes)

    def export(self, module: nn.Module, out_dir: str | Path) -> None:
        export_timm(module, self.student, out_dir, data_config=self.data_config)


@dataclass
class DatTask(DistillTask):
    """DAT (Mao et al. 2022), the baseline DAD improves on: the student attacks itself. Its discrete
    adversarial samples Q(PGD(Q(x))) follow the student's own gradient, so the discretizer runs here, on the
    student workers; the loss is CE on the clean and on the adversarial batch (robust.losses.objectives)."""

    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    attack: DADConfig = field(default_factory=DADConfig)
    precision: str = "auto"  # the discretizer's; the student's forward is the engine's own (bf16 on GPU)

    def build(self) -> nn.Module:
        self._model = super().build()
        self._vqgan = build_vqgan(self.vqgan)  # frozen, no optimizer state: outside the engine
        return self._model

    def loss(self, forward: Forward, rows: dict[str, np.ndarray], *, device: torch.device) -> tuple[Tensor, Terms]:
        x, y = B.images(rows[B.IMAGE], device), B.targets(rows, device)
        q = functools.partial(discretize, self._vqgan.to(device), precision=self.precision)
        self._model.eval()  # the attack reads the student as it is; BatchNorm statistics stay the training's
        try:
            x_adv = dad_samples(lambda z: forward(z).float(), q, x, y, self.attack, precision="fp32",
                                generator=generator(combine(rows[B.SEED]), device))
        finally:
            self._model.train()
        s_all = forward(torch.cat([x, x_adv])).float()
        return objective("dat", self.objective, student_logits=s_all[: len(x)], y=y, student_adv_logits=s_all[len(x):])


@dataclass
class RptTask:
    """RPT or one of its baselines (robust.rpt.baselines.METHODS): DeepSpeed trains the tuned part and
    the heads; the frozen backbone M_b runs outside the engine (no optimizer state), or not at all when
    the batches carry its cached features. A row is a clean or an augmented sample (``batch.AUGMENTED``);
    the methods trained on clean samples only (linear probe, full fine-tuning, VPT) skip the augmented ones."""

    method: str
    partial: PartialConfig
    loss_cfg: RptLossConfig
    select: SelectConfig  # eq. 6 at test time, recorded in the export
    cached: bool  # the batches carry M_b's features instead of images
    needs: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"RPT method {self.method!r} is unknown; use one of {sorted(METHODS)}")
        self.needs = (B.FEATS if self.cached else B.IMAGE, B.AUGMENTED, B.TEACHER_LOGITS, B.ROBUST_LOGITS)

    def build(self) -> nn.Module:
        self._student = build_method(self.method, self.partial)
        return self._student.tuned

    def _feats(self, rows: dict[str, np.ndarray], device: torch.device) -> Tensor:
        if self.cached:
            return B.tensor(rows, B.FEATS, device)
        return self._student.backbone.to(device)(B.images(rows[B.IMAGE], device))  # eval mode, no autograd

    def loss(self, forward: Forward, rows: dict[str, np.ndarray], *, device: torch.device) -> tuple[Tensor, Terms]:
        keep = np.ones(len(rows[B.LABEL]), dtype=bool) if METHODS[self.method].augmented else ~rows[B.AUGMENTED]
        if not keep.any():  # augmented rows only, for a clean-only method: a zero step keeps the ranks in lock-step
            logits = forward(self._feats({k: v[:1] for k, v in rows.items()}, device))
            return sum(s.float().sum() for s in logits.values()) * 0, {}
        rows = {k: v[keep] for k, v in rows.items()}
        logits = {head: s.float() for head, s in forward(self._feats(rows, device)).items()}
        # each teacher's rows are the samples it teaches (eq. 3: clean, eq. 4: augmented); the rest are unread
        loss, sums = rpt_loss(logits, B.tensor(rows, B.LABEL, device), is_aug_B=B.tensor(rows, B.AUGMENTED, device),
                              t_init_logits=B.tensor(rows, B.TEACHER_LOGITS, device).float(),
                              t_robust_logits=B.tensor(rows, B.ROBUST_LOGITS, device).float(),
                              cfg=method_loss_config(self.method, self.loss_cfg))
        return loss, {k: v / sums["n"] for k, v in sums.items() if k != "n" and not k.startswith("n_")}

    def export(self, module: nn.Module, out_dir: str | Path) -> None:
        if module is not self._student.tuned:
            raise RuntimeError("RptTask.export expects the module its build() returned")
        export_rpt(self._student, out_dir, method=self.method, cfg=self.partial, select=self.select)


@dataclass
class RobustTeacherTask:
    """The small robust teacher (SPEC 6): a timm model on AugMix (+ JSD) / PixMix views made on the worker
    (``robust.teacher_train.teacher_batch``); DeepAugment copies arrive as extra samples in the stream."""

    train: RobustTeacherConfig  # the model, its augmentations and their configs
    data_config: dict = field(default_factory=dict)  # the export's preprocessing (robust.eval.sets.timm_data_config)
    needs: tuple[str, ...] = (B.IMAGE,)

    def build(self) -> nn.Module:
        check_augmentations(self.train)
        self._mixing = None
        return build_timm(self.train.model)

    def loss(self, forward: Forward, rows: dict[str, np.ndarray], *, device: torch.device) -> tuple[Tensor, Terms]:
        x_NHWC = np.ascontiguousarray(rows[B.IMAGE])
        if "pixmix" in self.train.augmentations and self._mixing is None:  # the bank, once, at the data's size
            self._mixing = load_mixing_set(self.train.pixmix.mixing, size=x_NHWC.shape[1:3])
        # the views are drawn from the batch's seeds: AugMix from the global generators, PixMix from its own
        seed = combine(rows[B.SEED])
        seed_everything(seed)
        generator = torch.Generator().manual_seed(seed)
        batch = teacher_batch(x_NHWC, rows[B.LABEL], self.train, mixing_M3HW=self._mixing, generator=generator)
        loss = robust_teacher_loss(lambda x: forward(x.to(device)).float(), {**batch, "label": batch["label"].to(device)},
                                   self.train)
        return loss, {"loss": loss.detach()}

    def export(self, module: nn.Module, out_dir: str | Path) -> None:
        export_timm(module, self.train.model, out_dir, data_config=self.data_config)
