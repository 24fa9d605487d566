"""Probe for the DAD job's ``preset=local`` recipe (issue #12 item 3): CE, KD and DAD students on the digits
at 32 px, single process, one CPU thread, mirroring what the pipeline computes.

Mirrored from the pipeline: the cached stages (AugMix+JSD teacher, ``robust.teacher_train.cached_teacher``;
the digits VQGAN, ``robust.models.vqgan_train.train_vqgan`` under the same stage key as ``preset=local``);
per sample seeded crops (``robust.seeding.sample_seeds`` of (run seed, epoch, key), ``augment_image``);
each epoch visits the 128-sample shards in the order ``np.random.default_rng([seed, epoch])`` draws and
the epochs flow on into each other; an optimizer step is two micro-batches of 64 (the two DeepSpeed
workers; their gradients averaged), clipping at norm 1, AdamW, DeepSpeed's linear warm-up then cosine to
``min_lr_ratio``; every method of one seed starts from the same initialisation and sees the same crops;
the teacher side is ``robust.distill.teacher_targets`` per batch of 64 with the random starts of
``combine(seeds)``; the DAD student's forward is ``cat([x, x_dad])`` as ``DistillTask``'s; the losses are
``robust.losses.objectives.objective``; evaluation is ``robust.eval.benchmark.benchmark`` on the test
shards clean + the 15 corruptions x 5 severities (the job's ``held_out_set``).

DAD modes: ``online`` attacks every epoch's crops (cached under ``cache``: the samples depend on the stream,
the teacher, the VQGAN and the attack, not on the student, so recipes that change only the students reuse
them); ``offline`` generates ``copies`` epochs of crops with their DAD samples once and cycles them
(``copies=1`` is today's engine: every epoch trains on the epoch-0 crops, clean and DAD alike). Each run
appends its entry (recipe, per-stage times, per-epoch loss curves, per-seed accuracies and paired
differences) to ``benchmarks/results/local_recipe_search.json``.

    .venv/bin/python benchmarks/local_recipe_search.py name=NAME [seeds=[0,1,2]] [KEY=VALUE ...]
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from timm.utils import ModelEmaV3

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import machine, save_result  # noqa: E402
from benchmarks.recipe_stats import dad_diagnostics, paired, tail_drop  # noqa: E402
from robust.attacks.dad import DADConfig  # noqa: E402
from robust.cache import cache_dir_for, cached_stage, is_cached  # noqa: E402
from robust.config import load_config  # noqa: E402
from robust.data.digits import build_digits_shards, digits_arrays  # noqa: E402
from robust.distill import teacher_targets  # noqa: E402
from robust.eval.benchmark import benchmark  # noqa: E402
from robust.eval.sets import EvalSetConfig  # noqa: E402
from robust.losses.objectives import ObjectiveConfig, objective  # noqa: E402
from robust.models.timm_models import TimmConfig, build_timm  # noqa: E402
from robust.models.vqgan import build_vqgan, discretize  # noqa: E402
from robust.models.vqgan_train import VQGANTrainConfig, psnr, train_vqgan  # noqa: E402
from robust.seeding import combine, generator, sample_seeds, seed_everything  # noqa: E402
from robust.teacher_train import TeacherTrainConfig, cached_teacher, teacher_cache_dir  # noqa: E402
from robust.train_transforms import TrainAugConfig, augment_image, sample_transform  # noqa: E402

OUT = Path(__file__).parent / "results" / "local_recipe_search.json"
SHARD = 128  # build_digits_shards' max_per_shard
METHODS = ("ce", "kd", "dad")


@dataclass
class StudentRecipe:
    model: TimmConfig = field(default_factory=lambda: TimmConfig(name="test_resnet", num_classes=10))
    epochs: int = 6
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 10
    micro_batch_size: int = 64
    workers: int = 2  # micro-batches per optimizer step: the DeepSpeed workers
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.01
    ema_decay: float = 0.0  # optim.ema_decay: timm's ModelEmaV3 after every step, evaluated instead (0 = off)


@dataclass
class DadRecipe:
    attack: DADConfig = field(default_factory=lambda: DADConfig(eps=1.0, alpha=1.0))
    mode: str = "online"  # online | offline
    copies: int = 1  # offline: epochs of crops generated once and cycled
    kind: str = ""  # objective kind; "" = the engine's dad_<mode>
    # offline: the clean half of a batch from the fresh crops of its epoch (with the teacher's logits on
    # them, as KD's), the DAD half from the copies; False = today's engine (both from the copy)
    fresh_clean: bool = False


@dataclass
class Recipe:
    name: str = "today"
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    cache: str = "/tmp/local_recipe_search"
    teacher: TeacherTrainConfig = field(default_factory=lambda: TeacherTrainConfig(augmentations=["augmix"]))
    vqgan: VQGANTrainConfig = field(default_factory=VQGANTrainConfig)
    vqgan_steps: int = 600
    augment: TrainAugConfig = field(default_factory=lambda: TrainAugConfig(
        crop_size=32, scale=[0.7, 1.0], ratio=[0.9, 1.1], hflip=0.0, interpolation="bilinear", auto_augment="",
        color_jitter=0.0, re_prob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0))
    student: StudentRecipe = field(default_factory=StudentRecipe)
    dad: DadRecipe = field(default_factory=DadRecipe)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)


# --- cached stages -----------------------------------------------------------------------------------

def teacher_stage(r: Recipe) -> tuple[torch.nn.Module, dict]:
    """The AugMix teacher (built once per config) and its training seconds."""
    cache = Path(r.cache)
    done = teacher_cache_dir(cache, r.teacher).exists()
    t0 = time.perf_counter()
    teacher, folder = cached_teacher(cache, r.teacher, progress=False)
    info = folder / "probe_seconds.json"
    if not done:
        info.write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    return teacher, {"dir": folder.name, **json.loads(info.read_text())}


def vqgan_stage(r: Recipe) -> tuple[torch.nn.Module, dict]:
    """The digits VQGAN under preset=local's stage key, its training stats and its held-out error."""

    def build(out: Path) -> None:
        x_train = torch.from_numpy(digits_arrays()[0]).permute(0, 3, 1, 2).float() / 255
        vqgan, stats = train_vqgan(x_train, r.vqgan, steps=r.vqgan_steps, progress=False)
        save_file(vqgan.state_dict(), out / "vqgan.safetensors")
        (out / "stats.json").write_text(json.dumps(stats, indent=2))

    out = cached_stage(r.cache, "vqgan", {"vqgan": r.vqgan, "steps": r.vqgan_steps}, build)
    vqgan = build_vqgan(dataclasses.replace(r.vqgan.vqgan, checkpoint=str(out / "vqgan.safetensors")))
    x_test = torch.from_numpy(digits_arrays()[2]).permute(0, 3, 1, 2).float() / 255
    q_err = (discretize(vqgan, x_test) - x_test).flatten(1).norm(dim=1)
    stats = json.loads((out / "stats.json").read_text())
    return vqgan, {"dir": out.name, "train_psnr_db": stats["psnr_db"], "seconds": stats["seconds"],
                   "test_psnr_db": psnr(vqgan, x_test), "test_l2_q_minus_x": q_err.mean().item()}


# --- the stream --------------------------------------------------------------------------------------

def stream_order(n: int, *, seed: int, epochs: int) -> tuple[np.ndarray, np.ndarray]:
    """(sample index, epoch) of every row of ``epochs`` passes: each epoch's shards in its seeded order."""
    shards = [np.arange(s, min(s + SHARD, n)) for s in range(0, n, SHARD)]
    idx, ep = [], []
    for e in range(epochs):
        for i in np.random.default_rng([seed, e]).permutation(len(shards)):
            idx.append(shards[i])
            ep.append(np.full(len(shards[i]), e))
    return np.concatenate(idx), np.concatenate(ep)


def epoch_crops(x_NHWC: np.ndarray, keys: list[str], transform, *, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Every training image's crop of ``epoch`` (uint8 NHWC) and its sample seed, as the read tasks draw them."""
    seeds_N = sample_seeds(seed, [epoch] * len(keys), keys)
    return np.stack([augment_image(im, transform, seed=int(s)) for im, s in zip(x_NHWC, seeds_N)]), seeds_N


def to_unit(x_BHWC: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x_BHWC)).permute(0, 3, 1, 2).float().div_(255)


@dataclass
class Batch:
    x: torch.Tensor  # [0, 1] (B, 3, 32, 32) on the uint8 grid
    y: torch.Tensor
    t: torch.Tensor | None = None  # teacher logits
    x_dad: torch.Tensor | None = None
    t_dad: torch.Tensor | None = None


def micro_batches(r: Recipe, y_N: np.ndarray, *, seed: int,
                  epochs: int, steps: int) -> list[list[tuple[np.ndarray, int]]]:
    """Per optimizer step, its micro-batches as (sample indices, epoch of the crop)."""
    idx, ep = stream_order(len(y_N), seed=seed, epochs=epochs + 1)  # the last epoch runs on into the next
    mb, w = r.student.micro_batch_size, r.student.workers
    out = []
    for s in range(steps):
        rows = slice(s * mb * w, (s + 1) * mb * w)
        i, e = idx[rows], ep[rows]
        out.append([(i[k * mb:(k + 1) * mb], e[k * mb:(k + 1) * mb]) for k in range(w)])
    return out


# --- training ----------------------------------------------------------------------------------------

def lr_ratio(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """DeepSpeed's WarmupCosineLR (linear warm-up) at ``step``."""
    warmup = max(2, warmup)
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup + 1) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2


def dad_kind(r: Recipe) -> str:
    return r.dad.kind or f"dad_{r.dad.mode}"


def train_student(r: Recipe, method: str, batches_per_step, *, seed: int) -> tuple[torch.nn.Module, dict]:
    """One student over the prepared steps; returns it (eval mode) and its per-epoch loss curve and seconds."""
    seed_everything(seed)
    model = build_timm(r.student.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=r.student.lr, weight_decay=r.student.weight_decay)
    ema = ModelEmaV3(model, decay=r.student.ema_decay) if r.student.ema_decay else None
    kind = {"ce": "ce", "kd": "kd", "dad": dad_kind(r)}[method]
    total = len(batches_per_step)
    steps_per_epoch = total // r.student.epochs
    losses, terms_log = [], {}
    t0 = time.perf_counter()
    for step, micro in enumerate(batches_per_step):
        for group in opt.param_groups:
            group["lr"] = r.student.lr * lr_ratio(step, warmup=r.student.warmup_steps, total=total,
                                                  min_ratio=r.student.min_lr_ratio)
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for b in micro():
            adv = kind.startswith("dad")
            s_all = model(torch.cat([b.x, b.x_dad]) if adv else b.x)
            s, s_adv = (s_all[: len(b.x)], s_all[len(b.x):]) if adv else (s_all, None)
            loss, terms = objective(kind, r.objective, student_logits=s, y=b.y, teacher_logits=b.t,
                                    student_adv_logits=s_adv, teacher_adv_logits=b.t_dad)
            (loss / r.student.workers).backward()  # the workers' gradients are averaged
            step_loss += loss.item() / r.student.workers
            for k, v in terms.items():
                terms_log.setdefault(k, []).append(v.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.student.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(model, step=step)
        losses.append(step_loss)
    seconds = time.perf_counter() - t0
    per_epoch = [float(np.mean(losses[e * steps_per_epoch:(e + 1) * steps_per_epoch])) for e in range(r.student.epochs)]
    mb = r.student.workers
    terms_epoch = {k: [float(np.mean(v[e * steps_per_epoch * mb:(e + 1) * steps_per_epoch * mb]))
                       for e in range(r.student.epochs)] for k, v in terms_log.items() if k != "loss"}
    trained = model if ema is None else ema.module
    return trained.eval(), {"kind": kind, "seconds": seconds, "loss_per_epoch": per_epoch,
                            "terms_per_epoch": terms_epoch, "tail_drop": tail_drop(per_epoch)}


# --- one seed ----------------------------------------------------------------------------------------

def run_seed(r: Recipe, teacher, vqgan, data, *, seed: int, test_set: EvalSetConfig) -> dict:
    x_train, y_train, keys = data
    transform = sample_transform(r.augment)
    epochs = r.student.epochs
    steps_per_epoch = len(y_train) // (r.student.micro_batch_size * r.student.workers)
    steps = epochs * steps_per_epoch
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    crops = {e: epoch_crops(x_train, keys, transform, seed=seed, epoch=e) for e in range(epochs + 1)}
    times["crops_per_epoch_s"] = (time.perf_counter() - t0) / (epochs + 1)
    plan = micro_batches(r, y_train, seed=seed, epochs=epochs, steps=steps)

    def clean(i: np.ndarray, e: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return to_unit(np.stack([crops[int(ee)][0][ii] for ii, ee in zip(i, e)])), torch.from_numpy(y_train[i])

    diag: dict[str, list[float]] = {}

    def side(x: torch.Tensor, y: torch.Tensor, seeds: np.ndarray, *, dad: bool) -> dict:
        out = teacher_targets(teacher, x, y, precision="auto", vqgan=vqgan if dad else None,
                              dad=r.dad.attack if dad else None, generator=generator(combine(seeds)))
        if dad and len(diag.get("l2_dad_minus_x", [])) < 8:  # the first batches tell how strong the attack is
            for k, v in dad_diagnostics(out, x, y).items():
                diag.setdefault(k, []).append(v)
        return out

    # the teacher side, computed once and shared by KD and DAD (the same crops)
    need_t = {"kd", "dad"} & set(r.methods)
    t0 = time.perf_counter()
    t_logits = {}
    if need_t:
        with torch.no_grad():
            for s, micro in enumerate(plan):
                for k, (i, e) in enumerate(micro):
                    x, _ = clean(i, e)
                    t_logits[s, k] = teacher(x)
    times["teacher_logits_per_epoch_s"] = (time.perf_counter() - t0) / epochs

    dad_data: dict = {}
    if "dad" in r.methods:
        t0 = time.perf_counter()
        if r.dad.mode == "online":
            def build(out: Path) -> None:
                t_gen = time.perf_counter()
                for s, micro in enumerate(plan):
                    for k, (i, e) in enumerate(micro):
                        x, y = clean(i, e)
                        seeds = np.array([crops[int(ee)][1][ii] for ii, ee in zip(i, e)])
                        dad_data[s, k] = side(x, y, seeds, dad=True)
                torch.save({"dad_data": dad_data, "diag": diag, "seconds": time.perf_counter() - t_gen}, out / "dad.pt")

            # the samples depend on the stream, the teacher, the VQGAN and the attack only: students share them
            stage = {"seed": seed, "attack": r.dad.attack, "teacher": r.teacher, "vqgan": r.vqgan,
                     "vqgan_steps": r.vqgan_steps, "augment": r.augment, "epochs": epochs,
                     "micro_batch_size": r.student.micro_batch_size, "workers": r.student.workers}
            times["dad_generation_cached"] = is_cached(cache_dir_for(r.cache, "dad_online", stage))
            stored = torch.load(cached_stage(r.cache, "dad_online", stage, build) / "dad.pt", weights_only=False)
            dad_data, diag = stored["dad_data"], stored["diag"]
            gen_s = stored["seconds"]  # the generation's own time, also when it was read from the cache
            generated = steps * r.student.micro_batch_size * r.student.workers
        elif r.dad.mode == "offline":
            # copy c = the epoch-c stream in batches of 64, attacked once (write_generated of samples(1))
            n = len(y_train)
            dad_data = {"t": torch.zeros(r.dad.copies, n, 10), "x_dad": torch.zeros(r.dad.copies, n, 3, 32, 32),
                        "t_dad": torch.zeros(r.dad.copies, n, 10)}
            for c in range(r.dad.copies):
                idx, _ = stream_order(n, seed=seed, epochs=c + 1)
                idx = idx[-n:]
                for lo in range(0, n, r.student.micro_batch_size):
                    i = idx[lo:lo + r.student.micro_batch_size]
                    out = side(to_unit(crops[c][0][i]), torch.from_numpy(y_train[i]), crops[c][1][i], dad=True)
                    for key, col in (("t", "teacher_logits"), ("x_dad", "dad_image"), ("t_dad", "dad_teacher_logits")):
                        dad_data[key][c, i] = out[col]
            generated = r.dad.copies * len(y_train)
            gen_s = time.perf_counter() - t0
        else:
            raise ValueError(f"dad.mode must be online or offline, got {r.dad.mode!r}")
        times["dad_generation_s"] = gen_s
        times["dad_samples_per_s"] = generated / gen_s

    def batches(method: str):
        for s, micro in enumerate(plan):
            def make(s=s, micro=micro):
                for k, (i, e) in enumerate(micro):
                    if method == "dad" and r.dad.mode == "offline" and r.dad.fresh_clean:
                        c = e % r.dad.copies
                        x, y = clean(i, e)
                        yield Batch(x, y, t_logits[s, k], dad_data["x_dad"][c, i], dad_data["t_dad"][c, i])
                        continue
                    if method == "dad" and r.dad.mode == "offline":
                        c = e % r.dad.copies  # epoch e trains on copy e % copies, clean crops and DAD alike
                        x = to_unit(np.stack([crops[int(cc)][0][ii] for ii, cc in zip(i, c)]))
                        yield Batch(x, torch.from_numpy(y_train[i]), dad_data["t"][c, i], dad_data["x_dad"][c, i],
                                    dad_data["t_dad"][c, i])
                        continue
                    x, y = clean(i, e)
                    if method == "ce":
                        yield Batch(x, y)
                    elif method == "kd":
                        yield Batch(x, y, t_logits[s, k])
                    else:
                        d = dad_data[s, k]
                        yield Batch(x, y, d["teacher_logits"], d["dad_image"], d["dad_teacher_logits"])
            yield make

    students, train_logs = {}, {}
    for method in r.methods:
        students[method], train_logs[method] = train_student(r, method, list(batches(method)), seed=seed)
        times[f"train_{method}_s"] = train_logs[method]["seconds"]
    t0 = time.perf_counter()
    report = benchmark(students, [test_set], progress=False)
    times["eval_s"] = time.perf_counter() - t0
    acc = {m: {"clean": report["models"][m]["clean_acc"], "corrupt": report["models"][m]["corrupt_acc"],
               "per_corruption": report["models"][m]["per_corruption"]} for m in r.methods}
    return {"seed": seed, "acc": acc, "times": times, "train": train_logs,
            "dad_diagnostics": {k: float(np.mean(v)) for k, v in diag.items()}}


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)  # the other core belongs to someone else
    r = load_config(Recipe, overrides=argv)
    if not set(r.methods) <= set(METHODS):
        raise ValueError(f"methods {r.methods}: pick from {METHODS}")
    dirs = build_digits_shards(Path(r.cache) / "digits")
    test_set = EvalSetConfig(kind="shards", root=str(dirs["test"]), name="clean", image_size=32, crop_pct=1.0,
                             corruptions=["all"], shifted=False)
    teacher, teacher_info = teacher_stage(r)
    vqgan, vqgan_info = vqgan_stage(r) if "dad" in r.methods else (None, {})
    teacher_eval = Path(r.cache) / teacher_info["dir"] / "probe_eval.json"
    if not teacher_eval.exists():
        rep = benchmark({"teacher": teacher}, [test_set], progress=False)["models"]["teacher"]
        teacher_eval.write_text(json.dumps({"clean": rep["clean_acc"], "corrupt": rep["corrupt_acc"]}))
    teacher_info["acc"] = json.loads(teacher_eval.read_text())
    x_train, y_train, _, _ = digits_arrays()
    data = (x_train, y_train, [f"{i:05d}" for i in range(len(y_train))])
    results = []
    for seed in r.seeds:
        res = run_seed(r, teacher, vqgan, data, seed=seed, test_set=test_set)
        results.append(res)
        print(json.dumps({"name": r.name, "seed": seed, "times": res["times"],
                          "acc": {m: {k: a[k] for k in ("clean", "corrupt")} for m, a in res["acc"].items()},
                          "tail_drop": {m: res["train"][m]["tail_drop"] for m in r.methods},
                          "dad": res["dad_diagnostics"]}), flush=True)
    entry = {"recipe": json.loads(json.dumps(dataclasses.asdict(r))), "argv": argv, "teacher": teacher_info,
             "vqgan": vqgan_info, "seeds": results, "paired": paired(results, r.methods),
             "mean": {m: {k: float(np.mean([res["acc"][m][k] for res in results])) for k in ("clean", "corrupt")}
                      for m in r.methods}}
    print(json.dumps({"name": r.name, "mean": entry["mean"], "paired": entry["paired"]}), flush=True)
    log = json.loads(OUT.read_text()) if OUT.exists() else {"runs": []}
    log["machine"] = machine()
    log["runs"] = [run for run in log["runs"] if run["recipe"]["name"] != r.name] + [entry]
    save_result(OUT, log)


if __name__ == "__main__":
    main(sys.argv[1:])
