"""Distributed evaluation: test batches go through an actor pool on the teacher resource.

Every actor loads all the exported models once; per batch it corrupts the images once per
(corruption, severity) and scores every model on the same pixels. Actors return per-batch tallies
(sums and counts); the driver adds them and writes the report.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm import tqdm

from cluster.config import TEACHER_RESOURCE, TeacherPoolConfig
from cluster.pipeline import count_samples, read_raw
from robust.data.shards import decode_image
from robust.eval.corruptions import IMAGENET_C, corrupt
from robust.eval.evaluate import evaluate_batch
from robust.eval.metrics import Tally, summarize
from robust.eval.report import write_report
from robust.models.timm_models import load_exported


@dataclass
class EvalConfig:
    corruptions: list[str] = field(default_factory=lambda: list(IMAGENET_C))
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    batch_size: int = 150
    seed: int = 0  # corruption randomness: a batch's pixels depend on the seed and its keys only


def exported_model(path: Path) -> tuple[Path, str]:
    """(directory, stem) of an exported model given its directory or its .json/.safetensors file."""
    path = Path(path)
    if path.is_dir():
        stems = sorted(p.stem for p in path.glob("*.json") if p.with_suffix(".safetensors").is_file())
        if len(stems) != 1:
            raise ValueError(f"{path} must hold exactly one exported model (<stem>.safetensors + <stem>.json)")
        return path, stems[0]
    return path.parent, path.stem


class EvalWorker:
    def __init__(self, models: dict[str, tuple[str, str]], cfg: EvalConfig) -> None:
        self.cfg = cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.models = {name: load_exported(d, stem=stem).to(self.device).eval() for name, (d, stem) in models.items()}

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x_BHWC = np.stack([decode_image(b) for b in rows["png" if "png" in rows else "jpg"]])
        x = torch.from_numpy(x_BHWC).to(self.device).permute(0, 3, 1, 2).float().div_(255)
        y = torch.tensor([int(c) for c in rows["cls"]], device=self.device)
        seed = int.from_bytes(hashlib.sha256(("".join(rows["__key__"]) + str(self.cfg.seed)).encode()).digest()[:8], "little")
        generator = torch.Generator(self.device).manual_seed(seed)
        tallies = {name: evaluate_batch(m, x, y) for name, m in self.models.items()}
        for c in self.cfg.corruptions:
            for s in self.cfg.severities:
                x_cs = corrupt(x, c, s, generator=generator)
                for name, m in self.models.items():
                    tallies[name] = tallies[name] + evaluate_batch(m, x_cs, y, key=(c, s))
        return {"tallies": np.array([tallies], dtype=object), "n": np.array([len(y)])}


def evaluate_models(models: dict[str, Path], test_shards: str, cfg: EvalConfig, *, pools: TeacherPoolConfig,
                    out_dir: Path, costs_s: dict[str, float] | None = None) -> dict:
    """Evaluate exported models on ``test_shards`` clean and under the corruption suite; write the report."""
    if not test_shards:
        raise ValueError("nothing to evaluate on: pass data.test_shards=/path/to/test/shards")
    bad = sorted(set(cfg.corruptions) - set(IMAGENET_C) - {"speckle_noise", "gaussian_blur", "spatter", "saturate"})
    if bad:
        raise ValueError(f"unknown corruptions {bad} in eval.corruptions")
    located = {name: tuple(map(str, exported_model(p))) for name, p in models.items()}
    t0 = time.perf_counter()
    ds = read_raw(test_shards, shuffle=False).map_batches(
        EvalWorker, fn_constructor_kwargs={"models": located, "cfg": cfg}, batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=pools.min_actors, max_size=pools.max_actors),
        num_cpus=pools.cpus_per_actor, num_gpus=pools.gpus_per_actor, resources={TEACHER_RESOURCE: 1})
    totals = {name: Tally() for name in models}
    with tqdm(total=count_samples(test_shards), desc="evaluate", unit="img") as bar:
        for batch in ds.iter_batches(batch_size=1):
            for name, tally in batch["tallies"][0].items():
                totals[name] = totals[name] + tally
            bar.update(int(batch["n"][0]))
    report = {"models": {}, "eval": {"test_shards": test_shards, "corruptions": cfg.corruptions,
                                     "severities": cfg.severities, "seconds": time.perf_counter() - t0}}
    for name, tally in totals.items():
        d, stem = located[name]
        entry = {**summarize(tally), "weights": str(Path(d) / f"{stem}.safetensors")}
        if costs_s and name in costs_s:
            entry["train_cost_s"] = costs_s[name]
        report["models"][name] = entry
    write_report(report, out_dir)
    return report
