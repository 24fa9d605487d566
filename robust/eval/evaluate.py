"""Per-batch evaluation: run a model (a callable on [0, 1] images returning logits) and return a ``Tally``.

The functions are pure and batch-local, so the cluster layer can map them over workers and add the
tallies. A set is split into work items (``set_parts``: runs of samples or of a shard file) that are
evaluated on their own (``evaluate_part``, every model on the same pixels); ``evaluate_in_process`` is
the single-process loop over them (``evaluate_set`` for one model and one set). The caller puts the
model in the mode it wants (``model.eval()``); gradients are off here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm.auto import tqdm

from robust.data.shards import MANIFEST, read_manifest
from robust.eval.metrics import Key, Tally, classification_tally, flip_tally, routing_tally
from robust.eval.sets import EvalSet, Groups, ShardImages, corrupted_batches, to_unit

Model = Callable[[torch.Tensor], torch.Tensor]
Models = Mapping[str, Model]


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
    model: Model,
    x_BCHW: torch.Tensor,
    y_B: torch.Tensor,
    *,
    key: Key = "clean",
    shifted: bool,
    groups: Groups | None = None,
) -> Tally:
    """Top-1/top-5 and calibration counts of one labelled batch under ``key``; for a head-selecting RPT
    model (``robust.rpt.export.RptClassifier``) also its F_correct counts, the batch being ``shifted``
    data or in-distribution."""
    tally = classification_tally(predict(model, x_BCHW, groups=groups), y_B, key=key)
    return tally + _routing(model, key=key, shifted=shifted)


def _routing(model: Model, *, key: Key, shifted: bool, rows_B: torch.Tensor | None = None) -> Tally:
    """F_correct counts of the forward pass just made (of its ``rows_B``), for a model that selects heads."""
    selection = getattr(model, "last_selection", None)  # set by that forward pass
    if selection is None:
        return Tally()
    chose_clean_B = selection.chose_clean_B if rows_B is None else selection.chose_clean_B[rows_B]
    return routing_tally(chose_clean_B, key=key, shifted=shifted)


def evaluate_corrupted(
    model: Model,
    x_BCHW: torch.Tensor,
    y_B: torch.Tensor,
    corruption_B: Sequence[str],
    severity_B: Sequence[int] | torch.Tensor,
    *,
    groups: Groups | None = None,
) -> Tally:
    """A stored-corruption batch (ImageNet-C): counts under each sample's (corruption, severity) key,
    routing counted as on shifted data."""
    logits_BK = predict(model, x_BCHW, groups=groups)
    keys = [(c, int(s)) for c, s in zip(corruption_B, severity_B)]
    tally = Tally()
    for key in dict.fromkeys(keys):
        rows = torch.tensor([k == key for k in keys], device=logits_BK.device)
        tally = tally + classification_tally(logits_BK[rows], y_B.to(rows.device)[rows], key=key)
        tally = tally + _routing(model, key=key, shifted=True, rows_B=rows)
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
    return _x_c({"m": model}, x_BCHW, y_B, corruptions=corruptions, severities=severities, groups=groups,
                generator=generator)["m"]  # fmt: skip


def _x_c(
    models: Models,
    x_BCHW: torch.Tensor,
    y_B: torch.Tensor,
    *,
    corruptions: Iterable[str],
    severities: Iterable[int],
    groups: Groups | None,
    generator: torch.Generator | None,
) -> dict[str, Tally]:
    # Each corrupted batch is made once and scored by every model: all models see the same pixels.
    tallies = {name: Tally() for name in models}
    pairs = corrupted_batches([(x_BCHW, y_B)], corruptions=corruptions, severities=severities, generator=generator)
    for x_c, _, c, s in pairs:
        for name, model in models.items():
            tallies[name] = tallies[name] + evaluate_batch(model, x_c, y_B, key=(c, s), shifted=True, groups=groups)
    return tallies


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


def evaluate_models_on_batch(
    models: Models, eval_set: EvalSet, batch: list, *, generator: torch.Generator | None
) -> dict[str, Tally]:
    """One loader batch of ``eval_set`` through the matching per-batch function, for every model.

    Clean sets count under the set's name (plus (corruption, severity) for its configured X-C),
    ImageNet-C under (corruption, severity), ImageNet-P under ("flip", perturbation). Routing counts as
    the set's config says (``shifted``); corrupted batches are shifted.
    """
    kind, groups, x, y = eval_set.cfg.kind, eval_set.groups, batch[0], batch[1]
    if kind == "imagenet-c":
        return {n: evaluate_corrupted(m, x, y, batch[2], batch[3], groups=groups) for n, m in models.items()}
    if kind == "imagenet-p":
        step = eval_set.cfg.perturbation_step
        return {n: evaluate_sequences(m, x, batch[2], step=step) for n, m in models.items()}
    tallies = {n: evaluate_batch(m, x, y, key=eval_set.name, shifted=eval_set.cfg.shifted, groups=groups)
               for n, m in models.items()}  # fmt: skip
    if eval_set.corruptions:
        corrupted = _x_c(models, x, y, corruptions=eval_set.corruptions, severities=eval_set.cfg.severities,
                         groups=groups, generator=generator)  # fmt: skip
        tallies = {n: tallies[n] + corrupted[n] for n in models}
    return tallies


@dataclass
class Part:
    """A work item: a slice of a set that is evaluated on its own (its corruption noise depends on it only)."""

    dataset: Dataset | IterableDataset
    size: int | None  # samples (sequences for ImageNet-P), when known up front


class ShardSlice(IterableDataset):
    """Samples [start, stop) of one shard file, read in order (a tar has no random access)."""

    def __init__(self, shard: ShardImages, start: int, stop: int) -> None:
        self.shard, self.start, self.stop = shard, start, stop

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        return islice(iter(self.shard), self.start, self.stop)


def set_parts(eval_set: EvalSet, *, part_size: int) -> list[Part]:
    """Split ``eval_set`` into work items of at most ``part_size`` samples.

    Shard sets split each shard file by its manifest count (a whole file per item without a
    manifest); ImageNet-P is split per perturbation first: sequence lengths differ between
    perturbations, and a batch must stack its sequences.
    """
    if part_size < 1:
        raise ValueError(f"part_size must be >= 1, got {part_size}")
    dataset = eval_set.dataset
    if isinstance(dataset, ShardImages):
        root = Path(eval_set.cfg.root)
        counts = {i.name: i.count for i in read_manifest(root).shards} if (root / MANIFEST).is_file() else {}
        parts = []
        for path in dataset.shards.paths:
            shard = ShardImages(str(path), dataset.transform)
            if path.name not in counts:
                parts.append(Part(shard, None))
                continue
            count = counts[path.name]
            parts += [Part(ShardSlice(shard, i, min(i + part_size, count)), min(part_size, count - i))
                      for i in range(0, count, part_size)]  # fmt: skip
        return parts
    runs = [list(range(len(dataset)))]
    if eval_set.cfg.kind == "imagenet-p":
        by_perturbation: dict[str, list[int]] = {}
        for i, (_, _, (perturbation,)) in enumerate(dataset.samples):
            by_perturbation.setdefault(perturbation, []).append(i)
        runs = list(by_perturbation.values())
    return [Part(Subset(dataset, rows[i : i + part_size]), len(rows[i : i + part_size]))
            for rows in runs for i in range(0, len(rows), part_size)]  # fmt: skip


def part_generator(seed: int, set_name: str, part: int, batch: int, *, device: torch.device | str) -> torch.Generator:
    """The corruption noise of one batch, seeded by (seed, set, part, batch) only: any worker that evaluates
    that batch draws the same noise, so distributed and single-process results agree exactly."""
    digest = hashlib.sha256(f"{seed}/{set_name}/{part}/{batch}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little"))


def evaluate_part(
    models: Models,
    eval_set: EvalSet,
    part: Part,
    *,
    part_id: int,
    batch_size: int,
    seed: int = 0,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Tally], int]:
    """Every model on one work item of ``eval_set``: (tallies by model name, samples evaluated)."""
    tallies, n = {name: Tally() for name in models}, 0
    for b, batch in enumerate(DataLoader(part.dataset, batch_size=batch_size, num_workers=num_workers)):
        batch = [batch[0].to(device), batch[1].to(device), *batch[2:]]
        generator = part_generator(seed, eval_set.name, part_id, b, device=device)
        for name, tally in evaluate_models_on_batch(models, eval_set, batch, generator=generator).items():
            tallies[name] = tallies[name] + tally
        n += len(batch[1])
    return tallies, n


@dataclass
class SetResult:
    """One model's totals on one set: its tally and the samples (sequences for ImageNet-P) evaluated."""

    tally: Tally = field(default_factory=Tally)
    n: int = 0


def evaluate_in_process(
    models: Models,
    eval_sets: Sequence[EvalSet],
    *,
    batch_size: int = 150,
    part_batches: int = 8,
    seed: int = 0,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, dict[str, SetResult]]:
    """Every model on every set in this process, the work items in turn: {model: {set: SetResult}}.

    The same work items, batches and corruption noise as the cluster's actor pool given the same
    ``batch_size``, ``part_batches`` and ``seed``, hence the same counts.
    """
    plan = [(s, set_parts(s, part_size=batch_size * part_batches)) for s in eval_sets]
    sizes = [p.size for _, parts in plan for p in parts]
    totals = {name: {s.name: SetResult() for s in eval_sets} for name in models}
    with tqdm(total=None if None in sizes else sum(sizes), unit="sample", disable=not progress,
              desc=f"evaluate {len(models)} models on {len(eval_sets)} sets") as bar:  # fmt: skip
        for eval_set, parts in plan:
            for i, part in enumerate(parts):
                tallies, n = evaluate_part(models, eval_set, part, part_id=i, batch_size=batch_size, seed=seed,
                                           num_workers=num_workers, device=device)  # fmt: skip
                for name, tally in tallies.items():
                    result = totals[name][eval_set.name]
                    result.tally, result.n = result.tally + tally, result.n + n
                bar.update(n)
    return totals


def evaluate_set(
    model: Model,
    eval_set: EvalSet,
    *,
    batch_size: int = 64,
    part_batches: int = 8,
    seed: int = 0,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> Tally:
    """One model on one set in this process (``evaluate_in_process``): its tally."""
    totals = evaluate_in_process({"m": model}, [eval_set], batch_size=batch_size, part_batches=part_batches,
                                 seed=seed, num_workers=num_workers, device=device)  # fmt: skip
    return totals["m"][eval_set.name].tally
