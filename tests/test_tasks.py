"""What a trainer step computes, checked without Ray: DAT's attack follows the student's own gradient."""

from __future__ import annotations

import copy
import functools

import numpy as np
import torch

from cluster.engine import batch as B
from cluster.engine.tasks import DatTask
from robust.attacks.dad import DADConfig, dad_samples
from robust.losses.objectives import ObjectiveConfig
from robust.models.timm_models import TimmConfig
from robust.models.vqgan import VQGAN_PRESETS, VQGANConfig, discretize
from robust.seeding import combine, generator

VQ = VQGANConfig(**{**VQGAN_PRESETS["digits32_f4_128"], "n_embed": 16})
ATTACK = DADConfig(eps=1.0, alpha=1.0)


def _rows(n: int = 6) -> dict:
    rng = np.random.default_rng(0)
    return B.build({B.KEY: [f"k{i}" for i in range(n)], B.EPOCH: np.zeros(n, np.int64), B.SEED: np.arange(n),
                    B.VALID: np.ones(n, bool), B.SKIP_REASON: [""] * n, B.LABEL: rng.integers(0, 10, n),
                    B.IMAGE: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)})


def test_dat_attacks_the_student_with_its_own_gradient():
    torch.manual_seed(0)
    task = DatTask(TimmConfig(name="test_resnet", num_classes=10), "dat", ObjectiveConfig(), vqgan=VQ, attack=ATTACK,
                   precision="fp32")
    student = task.build()
    seen = []

    def forward(x):  # the engine's forward: the student, recording what it was asked
        seen.append(x.detach().clone())
        return student(x)

    rows = _rows()
    before = copy.deepcopy(student)  # the training forward below moves BatchNorm's statistics
    loss, terms = task.loss(forward, rows, device=torch.device("cpu"))
    x = B.images(rows[B.IMAGE], "cpu")
    trained_on = seen[-1]  # the last forward is the training step on [x; x_adv]
    assert torch.equal(trained_on[: len(x)], x)
    x_adv = trained_on[len(x):]
    q = functools.partial(discretize, task._vqgan, precision="fp32")

    def expected(model):
        model.eval()
        try:
            return dad_samples(model, q, x, B.targets(rows, "cpu"), ATTACK, precision="fp32",
                               generator=generator(combine(rows[B.SEED]), "cpu"))
        finally:
            model.train()

    torch.testing.assert_close(x_adv, expected(before))  # the student's own gradient, from the batch's seeds
    other = DatTask(TimmConfig(name="test_resnet", num_classes=10), "dat", ObjectiveConfig(), vqgan=VQ, attack=ATTACK)
    torch.manual_seed(1)
    assert (x_adv - expected(other.build())).abs().mean() > 1e-3  # another network points elsewhere
    assert set(terms) == {"loss", "ce_clean", "ce_adv"}
    torch.testing.assert_close(loss, terms["ce_clean"] + terms["ce_adv"])
    assert student.training  # back in training mode after the attack
