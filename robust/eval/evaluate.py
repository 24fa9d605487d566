"""Per-batch evaluation: run a model (a callable on [0, 1] images returning logits) and return a ``Tally``.

The functions are pure and batch-local, so the cluster layer can map them over workers and add the
tallies; ``evaluate_set`` is the single-process loop over one ``EvalSet``. The caller puts the model in
the mode it wants (``model.eval()``); gradients are off here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from robust.eval.metrics import Key, Tally, classification_tally, flip_tally
from robust.eval.sets import EvalSet, Groups, corrupted_batches, to_unit

Model = Callable[[torch.Tensor], torch.Tensor]


def project_logits(logits_BK: torch.Tensor, groups: Groups) -> torch.Tensor:
    """Logits of a class subset: class g scores the max logit over its ImageNet classes ``groups[g]``.

    With one index per group (ImageNet-R/-A) this keeps the 200 subset logits; ObjectNet groups several.
    """
    width = max(map(len, groups))
    # Pad each group with its own first index: the max is unchanged.
    idx_GM = torch.tensor([g + (g[0],) * (width - len(g)) for g in groups], device=logits_BK.device)
    return logits_BK[:, idx_GM].amax(dim=-1)


@torch.no_grad()
def predict(model: Model, x_BCHW: torch.Tensor, *, groups: Groups | None = None) -> torch.Tensor:
    logits_BK = model(to_unit(x_BCHW))
    return project_logits(logits_BK, groups) if groups is not None else logits_BK


def evaluate_batch(
    model: Model, x_BCHW: torch.Tensor, y_B: torch.Tensor, *, key: Key = "clean", groups: Groups | None = None
) -> Tally:
    """Top-1/top-5 and calibration counts of one labelled batch under ``key``."""
    return classification_tally(predict(model, x_BCHW, groups=groups), y_B, key=key)


def evaluate_corrupted(
    model: Model,
    x_BCHW: torch.Tensor,
    y_B: torch.Tensor,
    corruption_B: Sequence[str],
    severity_B: Sequence[int] | torch.Tensor,
    *,
    groups: Groups | None = None,
) -> Tally:
    """A stored-corruption batch (ImageNet-C): counts under each sample's (corruption, severity) key."""
    logits_BK = predict(model, x_BCHW, groups=groups)
    keys = [(c, int(s)) for c, s in zip(corruption_B, severity_B)]
    tally = Tally()
    for key in dict.fromkeys(keys):
        rows = torch.tensor([k == key for k in keys], device=logits_BK.device)
        tally = tally + classification_tally(logits_BK[rows], y_B.to(rows.device)[rows], key=key)
    return tally


def evaluate_x_c(
    model: Model,
    x_BCHW: torch.Tensor,
    y_B: torch.Tensor,
    *,
    corruptions: Iterable[str],
    severities: Iterable[int] = (1, 2, 3, 4, 5),
    groups: Groups | None = None,
    generator: torch.Generator | None = None,
) -> Tally:
    """On-the-fly X-C of one clean batch: counts under (corruption, severity) for every pair."""
    pairs = corrupted_batches([(x_BCHW, y_B)], corruptions=corruptions, severities=severities, generator=generator)
    return sum((evaluate_batch(model, x_c, y_B, key=(c, s), groups=groups) for x_c, _, c, s in pairs), Tally())


def evaluate_sequences(
    model: Model, x_BTCHW: torch.Tensor, perturbation_B: Sequence[str], *, step: int = 1
) -> Tally:
    """ImageNet-P: prediction flips along each sequence, counted per perturbation."""
    B, T = x_BTCHW.shape[:2]
    preds_BT = predict(model, x_BTCHW.flatten(0, 1)).argmax(dim=1).view(B, T)
    tally = Tally()
    for p in dict.fromkeys(perturbation_B):
        rows = torch.tensor([q == p for q in perturbation_B], device=preds_BT.device)
        tally = tally + flip_tally(preds_BT[rows], perturbation=p, step=step)
    return tally


def evaluate_set(
    model: Model,
    eval_set: EvalSet,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tally:
    """Every batch of ``eval_set`` through the matching per-batch function, summed.

    Clean sets count under the set's name (plus (corruption, severity) for its configured X-C),
    ImageNet-C under (corruption, severity), ImageNet-P under ("flip", perturbation).
    """
    kind, groups, tally = eval_set.cfg.kind, eval_set.groups, Tally()
    for batch in _batches(eval_set, batch_size=batch_size, num_workers=num_workers):
        x, y = batch[0].to(device), batch[1].to(device)
        if kind == "imagenet-c":
            tally = tally + evaluate_corrupted(model, x, y, batch[2], batch[3], groups=groups)
        elif kind == "imagenet-p":
            tally = tally + evaluate_sequences(model, x, batch[2], step=eval_set.cfg.perturbation_step)
        else:
            tally = tally + evaluate_batch(model, x, y, key=eval_set.name, groups=groups)
            if eval_set.corruptions:
                tally = tally + evaluate_x_c(
                    model, x, y, corruptions=eval_set.corruptions, severities=eval_set.cfg.severities,
                    groups=groups, generator=generator,
                )  # fmt: skip
    return tally


def _batches(eval_set: EvalSet, *, batch_size: int, num_workers: int) -> Iterator[list]:
    parts = [eval_set.dataset]
    if eval_set.cfg.kind == "imagenet-p":
        # Sequence lengths differ between perturbations: batch each perturbation on its own.
        rows: dict[str, list[int]] = {}
        for i, (_, _, (perturbation,)) in enumerate(eval_set.dataset.samples):
            rows.setdefault(perturbation, []).append(i)
        parts = [Subset(eval_set.dataset, idx) for idx in rows.values()]
    for part in parts:
        yield from DataLoader(part, batch_size=batch_size, num_workers=num_workers)
