"""What benchmarks/local_recipe_search.py reports of a run besides accuracy: how flat a loss curve ended,
how far DAD samples moved and how the teacher scores them, and the paired differences between methods."""

from __future__ import annotations

import numpy as np
import torch


def tail_drop(per_epoch: list[float]) -> dict[str, float]:
    """The share of the run's loss decrease (first to last epoch) made after half and after three
    quarters of the epochs: near 0 once the loss has flattened."""
    total = per_epoch[0] - per_epoch[-1]
    n = len(per_epoch)
    return {f"after_{q}": (per_epoch[round(q * (n - 1))] - per_epoch[-1]) / total if total > 0 else 0.0
            for q in (0.5, 0.75)}


def dad_diagnostics(out: dict, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """How far a batch's DAD samples moved from the crops, and the teacher's accuracy on both."""
    t, t_dad = out["teacher_logits"], out["dad_teacher_logits"]
    return {"l2_dad_minus_x": (out["dad_image"] - x).flatten(1).norm(dim=1).mean().item(),
            "teacher_acc_x": (t.argmax(1) == y).float().mean().item() * 100,
            "teacher_acc_dad": (t_dad.argmax(1) == y).float().mean().item() * 100,
            "teacher_max_prob_dad": t_dad.softmax(1).amax(1).mean().item()}


def paired(results: list[dict], methods: list[str]) -> dict:
    out = {}
    for a, b in (("dad", "ce"), ("dad", "kd"), ("kd", "ce")):
        if a in methods and b in methods:
            for metric in ("clean", "corrupt"):
                d = [res["acc"][a][metric] - res["acc"][b][metric] for res in results]
                out[f"{a}-{b}_{metric}"] = {"per_seed": d, "mean": float(np.mean(d)), "positive_every_seed": min(d) > 0}
    return out
