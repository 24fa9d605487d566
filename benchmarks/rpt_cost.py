"""Training cost per image of RPT vs full fine-tuning of the same model, and the inference FLOPs of its heads.

Run from the repository root:  .venv/bin/python -m benchmarks.rpt_cost     (~5 min, 1 thread)
Writes benchmarks/results/rpt_cost.json. Per model, one training step of
  (a) RPT without the feature cache: the frozen backbone's forward without autograd, then forward and
      backward of the tuned part (M_s + three heads) and AdamW over the trainable parameters only;
  (b) RPT with the feature cache: the same from backbone features computed beforehand;
  (c) full fine-tuning: the whole model's forward and backward and AdamW over all its parameters;
timed in the same run, interleaved a-b-c round after round (the machine is shared and its load drifts):
ms/img is the median over rounds, a/c and b/c the median of the ratios within each round. The loss is
``rpt_loss`` (CE + KD on the heads for RPT, CE for full fine-tuning, as the recipe trains them) on random
teacher logits: the teachers run in the teacher pool.
Issue targets: a/c <= 0.30, b/c <= 0.10 (paper Table 1: 750 vs 2500 ms/img = 0.30).

FLOPs (``torch.utils.flop_counter.FlopCounterMode``: 2 per multiply-add; matmuls, convolutions and
attention, which it sees once timm's fused attention is switched off, as the CPU SDPA kernel has no
FLOP formula) at inference per image: the plain model's forward; the RPT student with one pass of every
head (the heads' own overhead; paper: 3%); and eq. 6's selection (the backbone once, K MC-dropout
passes through the tuned part).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.machine import machine, save_result
from robust.models.timm_models import TimmConfig
from robust.rpt.baselines import build_method, method_loss_config
from robust.rpt.losses import RptLossConfig, rpt_loss
from robust.rpt.partial import PartialConfig, PartialModel
from robust.rpt.select import SelectConfig, predict

RESULTS = Path(__file__).parent / "results" / "rpt_cost.json"
TARGET_UNCACHED, TARGET_CACHED = 0.30, 0.10
PAPER = {"rpt_ms_per_img": 750, "full_finetune_ms_per_img": 2500, "ratio": 0.30, "heads_gflops_overhead_pct": 3.1,
         "source": "seed 002 Table 1 (CLIP ViT-L/14@336px, ViT-B/16 teacher) and sec. 5 (81.17 vs 83.7 GFLOPs)"}
PAPER_VIT_B_FRACTION = 3.1 / 88  # Table 10: ViT-B/16 student, 3.1M of 88M parameters tuned


@dataclasses.dataclass
class Setting:
    label: str
    timm: TimmConfig
    tune_fractions: dict[str, float]  # name -> fraction; fractions that give the same split are timed once
    batch: int
    steps: int  # training steps per timed measurement


def settings(*, batch_large: int, batch_tiny: int) -> list[Setting]:
    return [
        Setting("ViT-B/16 224 px (random init)", TimmConfig(name="vit_base_patch16_224", num_classes=1000),
                {"default": PartialConfig.tune_fraction, "paper Table 10 (3.1M / 88M)": PAPER_VIT_B_FRACTION},
                batch=batch_large, steps=1),  # fmt: skip
        Setting("test_vit 32 px (the local recipe's large model)",
                TimmConfig(name="test_vit", num_classes=10, img_size=32),
                {"default": PartialConfig.tune_fraction, "recipe preset=local": 0.2}, batch=batch_tiny, steps=20),
    ]


class Batch:
    """Random images, labels, half of them marked augmented, and both teachers' logits."""

    def __init__(self, n: int, size: tuple[int, int, int], classes: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, *size, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.is_aug = torch.arange(n) % 2 == 1
        self.t_init, self.t_robust = torch.randn(n, classes, generator=g), torch.randn(n, classes, generator=g)


def train_step(model: PartialModel, opt: torch.optim.Optimizer, batch: Batch, *, loss_cfg: RptLossConfig,
               feats: torch.Tensor | None = None) -> None:  # fmt: skip
    """One step; ``feats`` stands in for the backbone (the feature cache)."""
    feats = model.backbone_features(batch.x) if feats is None else feats
    loss, _ = rpt_loss(model.heads_forward(feats), batch.y, is_aug_B=batch.is_aug, t_init_logits=batch.t_init,
                       t_robust_logits=batch.t_robust, cfg=loss_cfg)  # fmt: skip
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def seconds(fn: Callable[[], None], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def inference_flops(student: PartialModel, plain: PartialModel, size: tuple[int, int, int], *, passes: int) -> dict:
    """GFLOPs per image: the plain model, the student with one pass of each head, and eq. 6 with K passes."""
    for module in (*student.modules(), *plain.modules()):
        if hasattr(module, "fused_attn"):  # explicit attention matmuls, which FlopCounterMode counts
            module.fused_attn = False
    x = torch.rand(1, *size)
    student.eval(), plain.eval()
    feats = student.backbone_features(x)
    g = {"plain": flops(lambda: plain(x)), "backbone": flops(lambda: student.backbone_features(x)),
         "tuned_all_heads_one_pass": flops(lambda: student.heads_forward(feats)),
         "shared": flops(lambda: student.tuned.shared(feats)),
         "mc_selection": flops(lambda: predict(student, x, cfg=SelectConfig(passes=passes)))}  # fmt: skip
    g["one_pass"] = g["backbone"] + g["tuned_all_heads_one_pass"]
    out = {f"{k}_gflops": v / 1e9 for k, v in g.items()}
    out["mc_passes"] = passes
    out["heads_only_overhead_pct"] = 100 * (g["one_pass"] - g["plain"]) / g["plain"]
    out["mc_selection_overhead_pct"] = 100 * (g["mc_selection"] - g["plain"]) / g["plain"]
    return out


def measure(setting: Setting, fraction: float, *, rounds: int, passes: int) -> dict:
    cfg = PartialConfig(timm=setting.timm, tune_fraction=fraction)
    torch.manual_seed(0)
    student = build_method("rpt", cfg)
    torch.manual_seed(0)
    full = build_method("full_finetune", cfg)
    size = tuple(student.info["input_size"])
    batch = Batch(setting.batch, size, setting.timm.num_classes)
    base = RptLossConfig()
    opt_rpt = torch.optim.AdamW(student.trainable_parameters(), lr=1e-4)
    opt_full = torch.optim.AdamW(full.trainable_parameters(), lr=1e-4)
    student.train(), full.train()
    with torch.no_grad():
        cached = student.backbone_features(batch.x)
    steps = {
        "rpt_uncached": lambda: train_step(student, opt_rpt, batch, loss_cfg=method_loss_config("rpt", base)),
        "rpt_cached": lambda: train_step(student, opt_rpt, batch, loss_cfg=method_loss_config("rpt", base),
                                         feats=cached),
        "full_finetune": lambda: train_step(full, opt_full, batch,
                                            loss_cfg=method_loss_config("full_finetune", base)),
    }  # fmt: skip
    for step in steps.values():  # warm-up: allocations, AdamW state
        step()
    per_round: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds):
        for name, step in steps.items():
            per_round[name].append(1000 * seconds(step, setting.steps) / setting.batch)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in per_round.items())
              + " ms/img", flush=True)  # fmt: skip
    ms = {k: statistics.median(v) for k, v in per_round.items()}
    # the ratios are taken within each round (a, b and c seconds apart), then the median: robust to load drift
    full_ms = per_round["full_finetune"]
    ratios = {f"{k}_over_full": statistics.median(a / c for a, c in zip(per_round[f"rpt_{k}"], full_ms))
              for k in ("uncached", "cached")}  # fmt: skip
    spread = {f"{k}_over_full": [min(r), max(r)] for k in ("uncached", "cached")
              for r in [[a / c for a, c in zip(per_round[f"rpt_{k}"], full_ms)]]}  # fmt: skip
    info = student.info
    g = inference_flops(student, full, size, passes=passes)
    # what the FLOPs alone predict, with a backward at twice its forward (AdamW and memory traffic left out)
    tuned, plain = 3 * g["tuned_all_heads_one_pass_gflops"], 3 * g["plain_gflops"]
    flop_ratios = {"uncached_over_full": (g["backbone_gflops"] + tuned) / plain, "cached_over_full": tuned / plain}
    return {
        "tune_fraction": fraction,
        "split": {"blocks": info["blocks"], "tune_from_block": info["tune_from_block"],
                  "tuned_blocks": info["blocks"] - info["tune_from_block"],
                  "shared_units": info["shared_units"], "head_units": info["head_units"]},  # fmt: skip
        "param_counts": student.param_counts(),
        "full_finetune_params": full.param_counts()["tuned"],
        "batch": setting.batch,
        "steps_per_measurement": setting.steps,
        "ms_per_img": ms,
        "per_round_ms_per_img": per_round,
        "ratios": ratios,
        "ratio_range_over_rounds": spread,
        "targets": {"uncached/full<=0.30": ratios["uncached_over_full"] <= TARGET_UNCACHED,
                    "cached/full<=0.10": ratios["cached_over_full"] <= TARGET_CACHED},  # fmt: skip
        "flop_model_ratios": flop_ratios,
        "inference_flops": g,
    }


def notes_for(label: str, runs: dict[str, dict]) -> list[str]:
    notes = []
    for name, run in runs.items():
        if "same_split_as" in run:
            notes.append(f"{label}, {name}: tune_fraction {run['tune_fraction']:.4f} gives the same split as "
                         f"'{run['same_split_as']}' (whole blocks only), so it was not timed again")  # fmt: skip
            continue
        r, s, f = run["ratios"], run["split"], run["inference_flops"]
        notes.append(
            f"{label}, {name}: tunes {s['tuned_blocks']} of {s['blocks']} blocks "
            f"({run['param_counts']['tuned'] / 1e6:.2f}M of {run['param_counts']['total'] / 1e6:.2f}M parameters, "
            f"heads = copies of {s['head_units'] or 'no unit'} + the classifier); "
            f"a/c = {r['uncached_over_full']:.3f} ({'met' if run['targets']['uncached/full<=0.30'] else 'MISSED'}), "
            f"b/c = {r['cached_over_full']:.3f} ({'met' if run['targets']['cached/full<=0.10'] else 'MISSED'}); "
            f"the FLOPs alone predict a/c {run['flop_model_ratios']['uncached_over_full']:.3f}, "
            f"b/c {run['flop_model_ratios']['cached_over_full']:.3f}; "
            f"heads-only FLOPs overhead {f['heads_only_overhead_pct']:.2f}%, eq. 6 with K={f['mc_passes']} "
            f"{f['mc_selection_overhead_pct']:.1f}%"
        )
    return notes


GENERAL_NOTES = [
    "Without the cache RPT still runs the frozen backbone's forward every step: with a backward costing about "
    "twice a forward, full fine-tuning costs about 3 forwards per image, so a/c cannot fall far below 1/3 "
    "(the frozen forward runs without autograd, which saves its activation stores) plus the tuned part's "
    "forward and backward: the 0.30 target is at this floor, and the feature cache is what removes it.",
    "The small test_vit (0.3M parameters, 3 MFLOPs per image) runs far below the CPU's arithmetic rate: "
    "its steps cost per operation (dispatch, autograd bookkeeping, AdamW over many small tensors), not per "
    "FLOP, so its ratios stay well above what its FLOPs predict; its numbers say how the local recipe runs, "
    "the ViT-B/16 numbers test the targets.",
    "ViT-B/16's blocks hold 7.1M parameters each, so the paper's 3.1M (3.5%) and the default 5% both tune "
    "its last block (plus the heads): the split is made of whole blocks.",
    "The heads' FLOPs overhead is that of the two extra copies of the head units (here the final norm and "
    "the classifier), tiny next to a ViT-B/16 forward; the paper's 3% (81.17 -> 83.7 GFLOPs, ViT-L/14) "
    "implies larger heads than a norm and a classifier, which it does not describe further. "
    "Eq. 6's K MC-dropout passes run the whole tuned part (M_s and the heads, where the dropout layers are) "
    "K times, which dominates the inference overhead.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 1 thread: on 2 shared, loaded cores, 2 threads made the small model's steps 3-10x slower (thread barriers)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-large", type=int, default=8)
    parser.add_argument("--batch-tiny", type=int, default=64)
    parser.add_argument("--passes", type=int, default=SelectConfig.passes, help="K MC-dropout passes (eq. 6)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start, t0 = os.getloadavg(), time.perf_counter()
    models, notes = [], []
    for setting in settings(batch_large=args.batch_large, batch_tiny=args.batch_tiny):
        runs: dict[str, dict] = {}
        for name, fraction in setting.tune_fractions.items():
            print(f"{setting.label}, {name} (tune_fraction {fraction:.4f})", flush=True)
            split = build_method("rpt", PartialConfig(timm=setting.timm, tune_fraction=fraction)).info
            same = next((n for n, r in runs.items() if r["split"]["tune_from_block"] == split["tune_from_block"]), None)
            runs[name] = ({"tune_fraction": fraction, "same_split_as": same, "split": runs[same]["split"]} if same
                          else measure(setting, fraction, rounds=args.rounds, passes=args.passes))  # fmt: skip
        models.append({"model": setting.label, "timm": dataclasses.asdict(setting.timm), "runs": runs})
        notes += notes_for(setting.label, runs)
    result = {
        "machine": {**machine(), "torch_threads": torch.get_num_threads(), "load_avg_start": load_start,
                    "load_avg_end": os.getloadavg()},  # fmt: skip
        "config": {"rounds": args.rounds, "optimizer": "AdamW", "dtype": "float32", "mc_passes": args.passes,
                   "statistic": "ms_per_img: median over interleaved rounds; ratios: median of per-round ratios",
                   "runtime_s": time.perf_counter() - t0},  # fmt: skip
        "paper": PAPER,
        "targets": {"uncached_over_full": TARGET_UNCACHED, "cached_over_full": TARGET_CACHED},
        "models": models,
        "notes": notes + GENERAL_NOTES,
    }
    save_result(args.out, result)


if __name__ == "__main__":
    main()
