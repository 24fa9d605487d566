"""Paired-seed studies of the local presets, checked against the issues' targets.

    .venv/bin/python benchmarks/seed_study.py dad [OVERRIDES...]          -> results/dad_seed_study.json
    .venv/bin/python benchmarks/seed_study.py rpt [OVERRIDES...]          -> results/rpt_seed_study.json
    .venv/bin/python benchmarks/seed_study.py topk [k=K] [OVERRIDES...]   -> results/soft_targets_accuracy.json
    .venv/bin/python benchmarks/seed_study.py dad seeds=[0,1,2,3,4]       -> results/dad_seed_study_5_seeds.json

Each study runs the recipe's ``preset=local`` with ``run.seeds=[0,1,2]`` (or ``seeds=[...]``; one process:
every seed trains through the same pools, and a seed pairs the methods: same images, same order, same
initialisation draws)
in ``/tmp/seed_study/<study>`` (the cached stages are built on the first run and reused), then reads the
run's study.json (``robust.eval.study``: per model the mean and sd over seeds, per pair of methods the
paired difference with its 95% t-interval) and checks the targets:

- ``dad`` (issue #12 item 3): corrupted accuracy DAD - CE >= 6 and DAD - KD >= 2 points, each positive on
  every seed; DAD's clean accuracy at most 1 point below CE's; every student's training loss flattened
  (under 5% of its decrease made in the last quarter of the steps, from its metrics.jsonl).
- ``rpt`` (issue #12 item 6): RPT's corrupted accuracy >= 2 points above the initial large model and above
  APT on every seed, its clean accuracy at most 1 point below the initial model's, F_correct > 60%.
- ``topk`` (issue #15 item 2, after ``dad``): the KD and DAD students with the teacher's top-k soft
  targets (``dad.soft_targets_topk=K``, default 3 of the digits' 10 classes) against the dad study's (all
  logits), seed by seed: the mean corrupted and clean accuracy they lose is at most 0.3 points.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from statistics import fmean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import machine, save_result  # noqa: E402
from benchmarks.recipe_stats import tail_drop  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
WORK = Path("/tmp/seed_study")
SEEDS = [0, 1, 2]
FLAT = 0.05  # the largest share of a student's loss decrease allowed in its last quarter of steps
# study -> (recipe, run.name under preset=local, result file)
STUDIES = {"dad": ("dad_imagenet.py", "local", "dad_seed_study.json"),
           "rpt": ("robustify_large.py", "rpt-local", "rpt_seed_study.json"),
           "topk": ("dad_imagenet.py", "local", "soft_targets_accuracy.json")}


def run_study(study: str, out_dir: Path, overrides: list[str], seeds: list[int]) -> tuple[dict, float]:
    """Run the study's recipe once over ``seeds``; its study.json and the wall seconds. Seeds already finished
    in ``out_dir`` under the same run.name are not trained again (the runner's resume)."""
    recipe, run_name, _ = STUDIES[study]
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "recipes" / recipe), "preset=local", f"run.out_dir={out_dir}",
           f"run.seeds=[{','.join(map(str, seeds))}]", *overrides]
    t0 = time.perf_counter()
    with open(out_dir / "study.log", "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {done.returncode}); see {out_dir / 'study.log'}")
    wall = time.perf_counter() - t0
    run_name = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("run.name=")), run_name)
    return json.loads((out_dir / run_name / "study.json").read_text()), wall


def pair(study: dict, a: str, b: str, metric: str) -> dict:
    """The study's paired difference a - b of ``metric``."""
    found = [p for p in study["pairs"] if {p["a"], p["b"]} == {a, b} and p["metric"] == metric]
    if not found:
        raise SystemExit(f"study.json has no pair {a} - {b} for {metric}")
    p = found[0]
    sign = 1 if p["a"] == a else -1
    values = [sign * v for v in p["values"]]
    ci = None if p["ci95"] is None else sorted(sign * c for c in p["ci95"])
    return {"a": a, "b": b, "metric": metric, "values": values, "mean": fmean(values), "ci95": ci,
            "all_positive": all(v > 0 for v in values)}


def model_means(study: dict, metrics: tuple[str, ...] = ("clean_acc", "corrupt_acc")) -> dict:
    return {name: {m: {k: entry["metrics"][m][k] for k in ("mean", "sd", "values")}
                   for m in metrics if m in entry["metrics"]}
            for name, entry in study["models"].items()}


def loss_flattened(run_dir: Path, methods: list[str]) -> dict:
    """Per student and seed, the share of its loss decrease (first to last logged step) made in the last
    quarter of its steps; under FLAT counts as converged."""
    out = {}
    for metrics in sorted(run_dir.glob("**/metrics.jsonl")):
        student = metrics.parent.name
        if student not in methods:
            continue
        losses = [row["loss"] for row in map(json.loads, metrics.read_text().splitlines()) if "loss" in row]
        out[str(metrics.parent.relative_to(run_dir))] = tail_drop(losses)["after_0.75"]
    return out


def dad(overrides: list[str], seeds: list[int]) -> dict:
    out_dir = WORK / "dad"
    study, wall = run_study("dad", out_dir, overrides, seeds)
    pairs = {"dad-ce corrupted": pair(study, "dad", "ce", "corrupt_acc"),
             "dad-kd corrupted": pair(study, "dad", "kd", "corrupt_acc"),
             "dad-ce clean": pair(study, "dad", "ce", "clean_acc"),
             "kd-ce corrupted": pair(study, "kd", "ce", "corrupt_acc")}
    flat = loss_flattened(out_dir / "local", ["ce", "kd", "dad"])
    targets = {"dad-ce corrupted >= 6, every seed > 0": pairs["dad-ce corrupted"]["mean"] >= 6
               and pairs["dad-ce corrupted"]["all_positive"],
               "dad-kd corrupted >= 2, every seed > 0": pairs["dad-kd corrupted"]["mean"] >= 2
               and pairs["dad-kd corrupted"]["all_positive"],
               "dad clean >= ce clean - 1": pairs["dad-ce clean"]["mean"] >= -1,
               f"every loss flattened (last-quarter share < {FLAT})": all(v < FLAT for v in flat.values())}
    return {"wall_s": wall, "models": model_means(study), "pairs": pairs, "last_quarter_loss_share": flat,
            "targets_met": targets}


def rpt(overrides: list[str], seeds: list[int]) -> dict:
    study, wall = run_study("rpt", WORK / "rpt", overrides, seeds)
    initial = "large (initial)"
    pairs = {"rpt-initial corrupted": pair(study, "rpt", initial, "corrupt_acc"),
             "rpt-apt corrupted": pair(study, "rpt", "apt", "corrupt_acc"),
             "rpt-initial clean": pair(study, "rpt", initial, "clean_acc")}
    for other in ("full_finetune", "wise_ft_0.5"):
        if other in study["models"]:
            pairs[f"rpt-{other} corrupted"] = pair(study, "rpt", other, "corrupt_acc")
    means = model_means(study, ("clean_acc", "corrupt_acc", "f_correct_overall"))
    f_correct = means["rpt"]["f_correct_overall"]["mean"]
    targets = {"rpt-initial corrupted >= 2, every seed > 0": pairs["rpt-initial corrupted"]["mean"] >= 2
               and pairs["rpt-initial corrupted"]["all_positive"],
               "rpt > apt corrupted on every seed": pairs["rpt-apt corrupted"]["all_positive"],
               "rpt clean >= initial clean - 1": pairs["rpt-initial clean"]["mean"] >= -1,
               "F_correct > 60%": f_correct > 60}
    return {"wall_s": wall, "models": means, "pairs": pairs, "targets_met": targets}


def topk(overrides: list[str], seeds: list[int]) -> dict:
    """The KD and DAD students with top-k soft targets against the dad study's (all logits, same seeds:
    the students' initialisation and data order do not depend on the other methods of a run)."""
    k = next((int(o.split("=", 1)[1]) for o in overrides if o.startswith("k=")), 3)
    overrides = [o for o in overrides if not o.startswith("k=")]
    full_file = RESULTS / STUDIES["dad"][2]
    full = json.loads(full_file.read_text()) if full_file.is_file() else None
    if full is None or full["overrides"] != overrides or full["seeds"] != seeds:
        raise SystemExit(f"run `benchmarks/seed_study.py dad {' '.join(overrides)}` first: its KD and DAD students "
                         f"are the all-logits side of the comparison ({full_file})")
    study, wall = run_study("topk", WORK / f"top{k}", ["run.methods=[kd,dad]", f"dad.soft_targets_topk={k}",
                                                        *overrides], seeds)
    models = model_means(study)
    cost = {}
    for method in ("kd", "dad"):
        for metric in ("clean_acc", "corrupt_acc"):
            values = [f - t for f, t in zip(full["models"][method][metric]["values"], models[method][metric]["values"])]
            cost[f"{method} {metric}"] = {"values": values, "mean": fmean(values)}
    targets = {f"top-{k} costs <= 0.3 points (mean over seeds)": all(c["mean"] <= 0.3 for c in cost.values())}
    return {"k": k, "wall_s": wall, "models": models, "cost_full_minus_topk": cost, "targets_met": targets}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in STUDIES:
        raise SystemExit(f"usage: seed_study.py {{{'|'.join(STUDIES)}}} [OVERRIDES...]")
    name, overrides = argv[0], argv[1:]
    out, seeds = RESULTS / STUDIES[name][2], SEEDS
    chosen = [o for o in overrides if o.startswith("seeds=")]
    if chosen:  # another seed list: its own result file, beside the 3-seed one the targets are read from
        seeds = json.loads(chosen[-1].split("=", 1)[1])
        overrides = [o for o in overrides if not o.startswith("seeds=")]
        out = out.with_name(f"{out.stem}_{len(seeds)}_seeds.json")
    result = {"machine": machine(), "study": name, "recipe": STUDIES[name][0], "seeds": seeds,
              "overrides": overrides, **{"dad": dad, "rpt": rpt, "topk": topk}[name](overrides, seeds)}
    print(json.dumps(result, indent=1))
    save_result(out, result)


if __name__ == "__main__":
    main(sys.argv[1:])
