"""Probe for the RPT job's ``preset=local`` recipe (issue #12 item 6): one method tuned in one process on the
digits at 32 px, each of its heads evaluated alone, and RPT's eq. 6 routing.

What it mirrors of the pipeline (``cluster.jobs.rpt``): the cached stages (``robust.teacher_train.cached_teacher``:
the large model on clean crops, the robust teacher with AugMix + DeepAugment); every epoch's tuning data: each
training image's seeded crop (``sample_seeds`` of (seed, epoch, key), ``augment_image``) as a clean sample, and
with probability ``fraction`` per candidate its AugMix view and the AugMix view of its DeepAugment copy as
augmented samples; the teachers' logits per batch (the initial model and the robust teacher, ``rpt_targets``);
``rpt_loss`` with the method's teachers (``method_loss_config``); AdamW with DeepSpeed's linear warm-up then
cosine to 1% (``local_recipe_search.lr_ratio``) and clipping at norm 1, one step per ``batch_size`` rows (the
preset's two workers x 64). What it does not: the DeepAugment copies are one ``deepaugment_dataset`` call
(the job draws a network per actor batch), the draw of an epoch's augmented share uses NumPy's generator, and
the feature cache's fixed copies are fresh crops here.

Evaluation: ``robust.eval.benchmark`` on the job's test set (``held_out_set``: the test shards, clean and the 15
corruptions x 5 severities) of the initial model, every head alone, and for three heads the routed classifier
(eq. 6, ``RptClassifier``). The crop, the AugMix views, the DeepAugment network and the test set are configured
by the preset itself (``PRESET``). Each run appends its entry, with the tuned part's share of a forward's FLOPs,
to ``benchmarks/results/rpt_recipe_search.json``.

    .venv/bin/python benchmarks/rpt_recipe_search.py name=NAME [KEY=VALUE ...]
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.local_recipe_search import lr_ratio  # noqa: E402
from benchmarks.machine import machine, save_result  # noqa: E402
from cluster.engine.evaluate import held_out_set  # noqa: E402
from cluster.jobs.rpt_local import OVERLAY, RptLocalConfig  # noqa: E402
from robust.augment import augmix_transform  # noqa: E402
from robust.config import load_config  # noqa: E402
from robust.data.digits import build_digits_shards, digits_arrays  # noqa: E402
from robust.deepaugment import autoencoder_for, deepaugment_dataset  # noqa: E402
from robust.eval.benchmark import benchmark  # noqa: E402
from robust.models.timm_models import TimmConfig  # noqa: E402
from robust.rpt.baselines import METHODS, build_method, method_loss_config  # noqa: E402
from robust.rpt.export import RptClassifier  # noqa: E402
from robust.rpt.losses import RptLossConfig, rpt_loss  # noqa: E402
from robust.rpt.partial import PartialConfig  # noqa: E402
from robust.rpt.select import SelectConfig  # noqa: E402
from robust.rpt.targets import augmented_view, rpt_targets  # noqa: E402
from robust.seeding import sample_seeds, seed_everything  # noqa: E402
from robust.teacher_train import TeacherTrainConfig, cached_teacher  # noqa: E402
from robust.train_transforms import augment_image, sample_transform  # noqa: E402

OUT = Path(__file__).parent / "results" / "rpt_recipe_search.json"
CACHE = Path("/tmp/rpt_recipe_search")
# the crop, the views, the DeepAugment network and the test set are the RPT job's preset=local's own
PRESET = load_config(RptLocalConfig, presets=[OVERLAY])


@dataclass
class Recipe:
    name: str = ""
    method: str = "rpt"
    large: TimmConfig = field(default_factory=lambda: TimmConfig(name="test_resnet", num_classes=10))
    large_epochs: int = 15  # the large model's clean training
    teacher: TimmConfig = field(default_factory=lambda: TimmConfig(name="test_efficientnet", num_classes=10))
    tune_from_block: int | None = 3
    tune_fraction: float = 0.2  # when tune_from_block is None
    epochs: int = 4
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.125  # share of the steps
    batch_size: int = 128
    fraction: float = 0.5  # a: each augmented candidate's probability per epoch
    loss: RptLossConfig = field(default_factory=RptLossConfig)
    seed: int = 0


def stages(r: Recipe) -> tuple[nn.Module, nn.Module, PartialConfig, dict]:
    """The cached large model and robust teacher, the student's split config, and the stage seconds."""
    t0 = time.perf_counter()
    large, large_dir = cached_teacher(CACHE, TeacherTrainConfig(model=r.large, augmentations=[], epochs=r.large_epochs),
                                      progress=False)
    t1 = time.perf_counter()
    teacher, _ = cached_teacher(CACHE, TeacherTrainConfig(model=r.teacher), progress=False)
    t2 = time.perf_counter()
    split = PartialConfig(timm=TimmConfig(**{**asdict(r.large), "checkpoint": str(large_dir)}),
                          tune_from_block=r.tune_from_block, tune_fraction=r.tune_fraction)
    return large, teacher, split, {"large_s": round(t1 - t0, 1), "teacher_s": round(t2 - t1, 1)}


def epoch_rows(r: Recipe, x_NHWC: np.ndarray, y_N: np.ndarray, x_da: np.ndarray, *, epoch: int, crop, augmix,
               augmented: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One epoch's (images, labels, augmented flags), shuffled: every clean crop, and the drawn augmented views."""
    n = len(x_NHWC)
    seeds = sample_seeds(r.seed, np.full(n, epoch), np.array([f"{i:09d}" for i in range(n)]))
    crops = np.stack([augment_image(x, crop, seed=int(s)) for x, s in zip(x_NHWC, seeds)])
    xs, ys, flags = [crops], [y_N], [np.zeros(n, dtype=bool)]
    if augmented:
        draw = np.random.default_rng([r.seed, epoch, 1])
        for source in (crops, np.stack([augment_image(x, crop, seed=int(s)) for x, s in zip(x_da, seeds)])):
            keep = draw.random(n) < r.fraction
            xs.append(np.stack([augmented_view(x, augmix, seed=int(s) + 1) for x, s in zip(source[keep], seeds[keep])]))
            ys.append(y_N[keep])
            flags.append(np.ones(int(keep.sum()), dtype=bool))
    x, y, flag = np.concatenate(xs), np.concatenate(ys), np.concatenate(flags)
    order = np.random.default_rng([r.seed, epoch]).permutation(len(x))
    return x[order], y[order], flag[order]


def tune(r: Recipe, large: nn.Module, teacher: nn.Module, split: PartialConfig) -> tuple[nn.Module, dict]:
    x_NHWC, y_N, _, _ = digits_arrays()
    da_cfg = PRESET.augmented.deepaugment
    net = autoencoder_for(torch.from_numpy(x_NHWC).permute(0, 3, 1, 2), da_cfg, progress=False)
    x_da, _ = deepaugment_dataset(x_NHWC, y_N, net, da_cfg, seed=r.seed)
    crop = sample_transform(PRESET.augment)
    augmix = augmix_transform(PRESET.augmented.augmix)
    augmented = METHODS[r.method].augmented
    seed_everything(r.seed)
    student = build_method(r.method, split)
    params = student.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay)
    loss_cfg = method_loss_config(r.method, r.loss)
    per_epoch = len(x_NHWC) * (1 + (2 * r.fraction if augmented else 0))
    total = r.epochs * math.ceil(per_epoch / r.batch_size)
    warmup, step, curve = max(1, round(r.warmup * total)), 0, []
    t0 = time.perf_counter()
    for epoch in range(r.epochs):
        x, y, flag = epoch_rows(r, x_NHWC, y_N, x_da, epoch=epoch, crop=crop, augmix=augmix, augmented=augmented)
        summed = 0.0
        for i in range(0, len(x), r.batch_size):
            x01 = torch.from_numpy(x[i:i + r.batch_size]).permute(0, 3, 1, 2).float() / 255
            aug_B = torch.from_numpy(flag[i:i + r.batch_size])
            targets = rpt_targets(large, teacher, x01, augmented_B=aug_B, precision="fp32")
            for group in opt.param_groups:
                group["lr"] = r.lr * lr_ratio(step, warmup=warmup, total=total, min_ratio=0.01)
            student.tuned.train()
            logits = student.heads_forward(student.backbone_features(x01))
            loss, _ = rpt_loss(logits, torch.from_numpy(y[i:i + r.batch_size]).long(), is_aug_B=aug_B,
                               t_init_logits=targets["teacher_logits"], t_robust_logits=targets["robust_logits"],
                               cfg=loss_cfg)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            summed += loss.item() * len(x01)
        curve.append(round(summed / len(x), 4))
    return student.eval(), {"train_s": round(time.perf_counter() - t0, 1), "steps": step, "loss_per_epoch": curve,
                            "params": student.param_counts(),
                            "tuned_flops_share": round(tuned_flops_share(student), 4)}


def tuned_flops_share(student: nn.Module) -> float:
    """The tuned part's (shared units and every head) share of one image's forward FLOPs, by torch's counter."""
    x01 = torch.zeros(1, 3, PRESET.augment.crop_size, PRESET.augment.crop_size)  # FLOPs do not depend on values
    with torch.no_grad(), FlopCounterMode(display=False) as frozen:
        feats = student.backbone_features(x01)
    with torch.no_grad(), FlopCounterMode(display=False) as tuned:
        student.heads_forward(feats)
    return tuned.get_total_flops() / (frozen.get_total_flops() + tuned.get_total_flops())


class OneHead(nn.Module):
    def __init__(self, student: nn.Module, head: str) -> None:
        super().__init__()
        self.student, self.head = student, head

    def forward(self, x01_BCHW: torch.Tensor) -> torch.Tensor:
        return self.student(x01_BCHW)[self.head]


def evaluate(student: nn.Module, large: nn.Module, teacher: nn.Module) -> dict:
    test = build_digits_shards(CACHE / "digits")["test"]
    models = {"initial": large, "robust teacher": teacher,
              **{f"head {h}": OneHead(student, h).eval() for h in student.head_names}}
    if len(student.head_names) == 3:
        models["routed (eq. 6)"] = RptClassifier(student, SelectConfig()).eval()
    report = benchmark(models, [held_out_set(str(test), PRESET.eval)], progress=False)
    keys = ("clean_acc", "corrupt_acc", "f_correct_overall")
    return {name: {k: round(m[k], 2) for k in keys if k in m} for name, m in report["models"].items()}


def main(argv: list[str]) -> None:
    r = load_config(Recipe, overrides=argv)
    if not r.name:
        raise ValueError("give the run a name=NAME: its entry in " + str(OUT))
    torch.set_num_threads(2)
    large, teacher, split, stage_s = stages(r)
    student, trained = tune(r, large, teacher, split)
    entry = {"name": r.name, "recipe": asdict(r), "stages": stage_s, **trained,
             "models": evaluate(student, large, teacher), "date": machine()["date"]}
    print(json.dumps(entry))
    runs = json.loads(OUT.read_text())["runs"] if OUT.is_file() else []
    save_result(OUT, {"machine": machine(), "runs": [*[e for e in runs if e["name"] != r.name], entry]})


if __name__ == "__main__":
    main(sys.argv[1:])
