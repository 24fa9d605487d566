"""The evaluation recipe end to end on a real local Ray cluster, checked against single-process evaluation.

Two exported test_resnet models (one random, one with a head fitted on digits) on two sets: digits
shards (the in-distribution set) and an ImageFolder of other digits, each with X-C (contrast and
gaussian noise at severities 1 and 5). The report's numbers must equal evaluate_set's on the same
pixels (same work items, same corruption noise), and the clean / contrast accuracies a plain loop over
the images; the markdown has one row per model; the plots are valid PNGs redrawn from report.json.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from statistics import fmean

import numpy as np
import open_clip
import pytest
import safetensors.torch
import torch
from PIL import Image

from cluster.jobs.evaluation import load_costs
from cluster.jobs.evaluation_local import EvaluationLocalConfig, local_models, prepare
from robust.data.digits import digits_arrays
from robust.eval.corruptions import corrupt
from robust.eval.evaluate import evaluate_set
from robust.eval.models import ZeroShotConfig, load_model, parse_model
from robust.eval.report import set_entry, write_report
from robust.eval.sets import EvalSetConfig, build_eval_set
from robust.models.normalize import normalize_images
from robust.models.timm_models import TimmConfig, build_timm, export_timm, load_exported

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CORRUPTIONS, SEVERITIES = ["contrast", "gaussian_noise"], [1, 5]
BATCH, PART_BATCHES = 16, 2


def _recipe_main():
    spec = importlib.util.spec_from_file_location("evaluate_recipe", REPO / "recipes" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """{"random": dir, "trained": dir} of exported 10-class test_resnets; "trained" has a least-squares head."""
    root = tmp_path_factory.mktemp("models")
    cfg = TimmConfig(name="test_resnet", num_classes=10)
    torch.manual_seed(0)
    out = {"random": root / "random", "trained": root / "trained"}
    export_timm(build_timm(cfg).eval(), cfg, out["random"])
    # A linear probe on random features, fitted in closed form: ~80% on digits in a second (SGD on
    # this shared CPU would take tens of seconds).
    model = build_timm(cfg).eval()
    x, y, _, _ = digits_arrays()
    with torch.no_grad():
        x_BCHW = normalize_images(torch.from_numpy(x[:400]).permute(0, 3, 1, 2).float() / 255, model.mean, model.std)
        f_BD = model.model.forward_head(model.model.forward_features(x_BCHW), pre_logits=True)
        f_BD = torch.cat([f_BD, torch.ones(len(f_BD), 1)], dim=1)
        target_BK = torch.nn.functional.one_hot(torch.from_numpy(y[:400]), 10).float()
        W_DK = torch.linalg.solve(f_BD.T @ f_BD + 1e-2 * torch.eye(f_BD.shape[1]), f_BD.T @ target_BK)
        head = model.model.get_classifier()
        head.weight.copy_(W_DK[:-1].T)
        head.bias.copy_(W_DK[-1])
    export_timm(model, cfg, out["trained"])
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An ImageFolder of 80 digits test images that are not in the test shards (those hold the first 96)."""
    root = tmp_path_factory.mktemp("folder")
    _, _, x_test, y_test = digits_arrays()
    for i in range(96, 176):
        path = root / str(y_test[i]) / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(x_test[i]).save(path)
    return root


def _sets(small_shards, folder) -> list[EvalSetConfig]:
    common = {"image_size": 32, "crop_pct": 1.0, "corruptions": CORRUPTIONS, "severities": SEVERITIES}
    return [EvalSetConfig(kind="shards", root=str(small_shards["test"]), name="clean", shifted=False, **common),
            EvalSetConfig(kind="imagefolder", root=str(folder), name="folder", **common)]  # fmt: skip


def _write_config(path: Path, sets: list[EvalSetConfig], **extra) -> Path:
    from omegaconf import OmegaConf

    cfg = {"sets": [OmegaConf.to_container(OmegaConf.structured(s)) for s in sets], **extra}
    path.write_text(OmegaConf.to_yaml(cfg))
    return path


def _hand_counts(model, x_NCHW: torch.Tensor, y_N: torch.Tensor) -> int:
    with torch.no_grad():
        return int((model(x_NCHW).argmax(dim=1) == y_N).sum())


def test_recipe_report_equals_single_process_evaluation(ray_cluster, small_shards, exports, folder, tmp_path):
    sets = _sets(small_shards, folder)
    costs = tmp_path / "dad_report.json"  # a DAD report's training costs feed the cost plot
    cost = {"random": {"startup_s": 9.0, "train_s": 3.0, "train_samples": 600},
            "trained": {"startup_s": 9.0, "train_s": 12.0, "train_samples": 600}}
    costs.write_text(json.dumps({"models": cost}))
    config = _write_config(tmp_path / "eval.yaml", sets, eval={"batch_size": BATCH, "part_batches": PART_BATCHES},
                           pools={"min_actors": 1, "max_actors": 2, "gpus_per_actor": 0, "cpus_per_actor": 1})
    out = tmp_path / "out"
    models = f"models=[random={exports['random']},trained=local-dir:{exports['trained']}]"
    assert _recipe_main()([f"config={config}", models, f"costs={costs}", f"out_dir={out}"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "config.yaml").is_file() and set(report["models"]) == {"random", "trained"}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the one-CPU actors: the same float summation order
    try:
        for name, path in exports.items():
            model = load_exported(path).eval()
            for cfg in sets:
                direct = evaluate_set(model, build_eval_set(cfg), batch_size=BATCH, part_batches=PART_BATCHES)
                got = report["per_set"][name][cfg.name]
                n = int(direct.stats[cfg.name]["n"])
                assert got["n"] == n == {"clean": 96, "folder": 80}[cfg.name]
                expected = set_entry(direct, cfg.name, n=n)
                # counts: top-1 / top-5 per key are integers, so equal percentages are equal counts
                assert got["acc"] == expected["acc"] and got["top5"] == expected["top5"]
                assert got["per_corruption"] == expected["per_corruption"]
                assert got["ece"] == pytest.approx(expected["ece"], abs=1e-9)
                assert set(got["per_corruption"]) == set(CORRUPTIONS)
                assert [v is None for v in got["per_corruption"]["contrast"]] == [False, True, True, True, False]
            # a plain loop over the same pixels: clean and contrast-5 accuracy of the folder, clean of the shards
            folder_set = build_eval_set(sets[1])
            x = torch.stack([folder_set.dataset[i][0] for i in range(80)]).float() / 255
            y = torch.tensor([folder_set.dataset[i][1] for i in range(80)])
            per_set = report["per_set"][name]
            assert round(per_set["folder"]["acc"] * 80 / 100) == _hand_counts(model, x, y)
            contrast5 = per_set["folder"]["per_corruption"]["contrast"][4]
            assert round(contrast5 * 80 / 100) == _hand_counts(model, corrupt(x, "contrast", 5), y)
            _, _, x_test, y_test = digits_arrays()
            x = torch.from_numpy(x_test[:96]).permute(0, 3, 1, 2).float() / 255
            assert round(per_set["clean"]["acc"] * 96 / 100) == _hand_counts(model, x, torch.from_numpy(y_test[:96]))
    finally:
        torch.set_num_threads(threads)

    for name, entry in report["models"].items():  # the DAD report's fields, from the in-distribution set
        per_set = report["per_set"][name]
        assert entry["clean_acc"] == per_set["clean"]["acc"]
        assert entry["per_corruption"] == per_set["clean"]["per_corruption"]
        assert entry["sets"] == {"folder": per_set["folder"]["acc"], "folder-C": per_set["folder"]["corrupt_acc"]}
        assert {k: entry[k] for k in cost[name]} == cost[name]
        assert entry["train_ms_per_sample"] == pytest.approx(1000 * cost[name]["train_s"] / 600)
        assert entry["weights"].endswith("model.safetensors")
    trained = report["models"]["trained"]
    assert trained["clean_acc"] > 60 > report["models"]["random"]["clean_acc"]

    md = (out / "report.md").read_text()
    assert "| Model | Clean | folder | folder-C | Corrupted (mean) | mCE | Avg shifts |" in md
    avg = fmean([trained["sets"]["folder"], trained["sets"]["folder-C"], trained["corrupt_acc"]])
    row = (f"| trained | {trained['clean_acc']:.2f} | {trained['sets']['folder']:.2f} | "
           f"{trained['sets']['folder-C']:.2f} | {trained['corrupt_acc']:.2f} | - | {avg:.2f} |")  # fmt: skip
    table = md.split("## Accuracy (%)")[1].split("##")[0]
    assert row in table and sum(line.startswith("| random |") for line in table.splitlines()) == 1

    # The plots are valid PNGs; redrawn from report.json they are byte-identical and count 2 series each.
    redrawn = write_report(report, tmp_path / "redrawn")
    assert redrawn.series == {"severity": 2, "corruptions": 2, "cost": 2}
    for plot, path in redrawn.plots.items():
        png = (out / f"{plot}.png").read_bytes()
        assert png[:8] == PNG_SIGNATURE and png == path.read_bytes()
        with Image.open(out / f"{plot}.png") as im:
            im.verify()


def _fails(argv: list[str], match: str, out: Path) -> None:
    with pytest.raises(SystemExit, match=match):
        _recipe_main()([*argv, f"out_dir={out}"])
    assert not out.exists()  # it failed before any work


def test_bad_input_fails_before_any_work_with_what_to_do(small_shards, exports, folder, tmp_path):
    good_sets, out = _sets(small_shards, folder), tmp_path / "out"
    model = f"models=[{exports['trained']}]"

    def config(sets) -> str:
        return f"config={_write_config(tmp_path / 'c.yaml', sets)}"

    _fails([config([EvalSetConfig(kind="imagenet-x", root=str(folder))]), model], "unknown eval set kind", out)
    flat = tmp_path / "flat"  # images directly under the root: not <class>/<image>
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(flat / "a.png")
    _fails([config([good_sets[0], EvalSetConfig(kind="imagefolder", root=str(flat))]), model],
           r"expected the layout root/<class>/<image>", out)  # fmt: skip
    _fails([config(good_sets), f"models=[{tmp_path / 'nope'}]"], "does not exist", out)
    cfg = TimmConfig(name="test_resnet", num_classes=5)
    export_timm(build_timm(cfg), cfg, tmp_path / "five")
    _fails([config(good_sets), f"models=[{tmp_path / 'five'}]"], r"needs models with 10 classes.*'five' \(5\)", out)
    _fails([config(good_sets), "models=[timm:resnet50]"], r"'resnet50' \(1000\)", out)  # no download: metadata only
    _fails([config(good_sets), "models=[timm:resnet50.no_such_tag]"], "no pretrained weights", out)
    _fails([config(good_sets), f"models=[a={exports['trained']},a={exports['random']}]"], "repeat", out)
    _fails([config(good_sets[:1] + [EvalSetConfig(kind="imagefolder", root=str(folder), name="x", shifted=False)]),
            model], "2 sets are marked shifted: false", out)  # fmt: skip
    _fails([config(good_sets), model, "eval.batch_sise=3"], "batch_sise", out)
    _fails([model], "no sets", out)
    _fails(["preset=local", f"local.runs={tmp_path / 'no_runs'}"], r"recipes/dad_imagenet.py preset=local", out)


def test_preset_local_finds_the_dad_runs_models_teacher_and_costs(exports, tmp_path):
    run_dir = tmp_path / "runs" / "local"
    for method in ("ce", "dad"):
        export_timm(load_exported(exports["trained"]), TimmConfig(name="test_resnet", num_classes=10), run_dir / method)
    teacher = export_timm(load_exported(exports["random"]), TimmConfig(name="test_resnet", num_classes=10),
                          tmp_path / "runs" / "cache" / "timm-teacher-x")  # fmt: skip
    (run_dir / "config.yaml").write_text(f"teacher:\n  kind: timm\n  timm:\n    checkpoint: {teacher}\n")
    (run_dir / "report.json").write_text(json.dumps({"models": {"ce": {"train_s": 5.0}, "teacher": {}}}))
    assert local_models(run_dir) == [f"ce={run_dir / 'ce'}", f"dad={run_dir / 'dad'}", f"teacher={teacher}"]
    cfg = EvaluationLocalConfig()
    cfg.local.runs = str(tmp_path / "runs")
    prepare(cfg)
    assert cfg.costs == str(run_dir / "report.json") and len(cfg.models) == 3
    (test_set,) = cfg.sets
    assert test_set.name == "clean" and test_set.corruptions == ["all"] and test_set.image_size == 32
    assert len(build_eval_set(test_set).corruptions) == 15  # digits test shards, built in the run's cache


def test_costs_files_and_model_specs(exports, tmp_path):
    rpt = tmp_path / "report.json"
    rpt.write_text(json.dumps({"models": {"rpt": {"train_s": 2.5, "train_samples": 10, "clean_acc": 80.0}, "zs": {}}}))
    assert load_costs(str(rpt)) == {"rpt": {"train_s": 2.5, "train_samples": 10}, "zs": {}}
    plain = tmp_path / "costs.json"
    plain.write_text(json.dumps({"dad": 120}))
    with pytest.raises(ValueError, match="not a report.json"):
        load_costs(str(plain))

    zs = ZeroShotConfig()
    by_dir = parse_model(str(exports["trained"]), clip=zs)
    assert (by_dir.name, by_dir.kind, by_dir.num_classes) == ("trained", "export", 10)
    assert parse_model(f"s=local-dir:{exports['trained']}", clip=zs).name == "s"
    assert parse_model("timm:resnet50.a1_in1k", clip=zs).num_classes == 1000
    with pytest.raises(ValueError, match="list_models"):
        parse_model("clip:ViT-Nope/openai", clip=zs)
    with pytest.raises(ValueError, match="neither an open_clip tag"):
        parse_model("clip:ViT-B-16/not_a_tag", clip=zs)


def test_clip_spec_loads_a_local_checkpoint_as_a_zero_shot_classifier(tmp_path):
    arch = "robust-test-eval-clip"  # a random-weight architecture: no download anywhere
    (tmp_path / f"{arch}.json").write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
    }))  # fmt: skip
    open_clip.add_model_config(tmp_path / f"{arch}.json")
    weights = tmp_path / "clip.safetensors"
    safetensors.torch.save_file(open_clip.create_model(arch).state_dict(), str(weights))
    zs = ZeroShotConfig(class_names=["zero", "one", "two"], templates=["a digit {}."], cache_dir=str(tmp_path / "c"))
    spec = parse_model(f"clip:{arch}/{weights}", clip=zs)
    assert (spec.kind, spec.num_classes, spec.weights) == ("clip", 3, f"clip:{arch}/{weights}")
    logits = load_model(spec, clip=zs)(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
