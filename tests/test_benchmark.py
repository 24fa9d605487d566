"""robust.eval.benchmark: the documented one-call example, run as written, against a direct computation;
modules, export folders and spec strings scored alike; errors that say what to do."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import timm.data
import torch

from robust.data.digits import build_digits_shards, digits_arrays
from robust.eval.benchmark import benchmark
from robust.eval.corruptions import corrupt
from robust.eval.sets import EvalSetConfig
from robust.models.timm_models import TimmConfig, build_timm, export_timm

torch.set_num_threads(1)
DOCS = Path(__file__).parents[1] / "docs" / "evaluation.md"


def _documented_example() -> str:
    section = DOCS.read_text().split("## In one process: `benchmark`")[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_documented_example_matches_a_direct_computation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example builds its shards under ./digits
    namespace: dict = {}
    exec(_documented_example(), namespace)
    entry, model = namespace["report"]["models"]["convnext"], namespace["model"]
    # by hand: the digits test images (the shards' source), timm's mean/std, one batch, no project code path
    _, _, x_test, y_test = digits_arrays()
    x01_BCHW, y_B = torch.from_numpy(x_test).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(y_test)
    data_cfg = timm.data.resolve_model_data_config(model)
    mean, std = (torch.tensor(data_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))

    def accuracy(x01: torch.Tensor) -> float:
        with torch.no_grad():
            return 100 * (model((x01 - mean) / std).argmax(1) == y_B).double().mean().item()

    assert len(y_B) == 450 and namespace["report"]["per_set"]["convnext"]["shards"]["n"] == 450
    assert entry["clean_acc"] == pytest.approx(accuracy(x01_BCHW), abs=1e-9)
    # contrast and pixelate draw no noise: a direct corrupt() of the whole set gives the same pixels
    for c in ("contrast", "pixelate"):
        want = [accuracy(corrupt(x01_BCHW, c, s)) for s in (1, 5)]
        assert entry["per_corruption"][c] == [pytest.approx(want[0], abs=1e-9), None, None, None,
                                              pytest.approx(want[1], abs=1e-9)]  # fmt: skip
    assert 5 < entry["clean_acc"] < 30  # random weights; predictions spread over several classes
    assert entry["weights"] == "module:ConvNeXt"


@pytest.fixture(scope="module")
def digits_test(tmp_path_factory) -> Path:
    return build_digits_shards(tmp_path_factory.mktemp("digits"))["test"]


def _sets(test: Path, **clean) -> list[EvalSetConfig]:
    common = dict(kind="shards", root=str(test), image_size=32, crop_pct=1.0)
    return [EvalSetConfig(name="clean", **{"shifted": False, **common, **clean}),
            EvalSetConfig(name="again", **common)]  # the same images scored as a shifted column  # fmt: skip


def test_modules_export_folders_and_specs_are_scored_alike(tmp_path, digits_test):
    torch.manual_seed(0)
    cfg = TimmConfig(name="test_convnext", num_classes=10)
    model = build_timm(cfg).eval()
    folder = export_timm(model, cfg, tmp_path / "convnext")
    report = benchmark({"wrapped": model, "bare": model.model, "folder": str(folder), "local": f"local-dir:{folder}"},
                       _sets(digits_test), batch_size=100, progress=False)  # fmt: skip
    entries = report["models"]
    assert entries["folder"]["weights"] == str(folder.resolve() / "model.safetensors")
    assert entries["wrapped"]["weights"] == entries["bare"]["weights"] == "module:ConvNeXt"
    accuracies = {name: (e["clean_acc"], e["sets"]["again"]) for name, e in entries.items()}
    assert len(set(accuracies.values())) == 1, accuracies  # the bare timm model was normalised like the rest
    clean, again = accuracies["folder"]
    assert clean == again and report["per_set"]["folder"]["again"]["n"] == 450
    assert set(report["eval"]) == {"sets", "seed", "frost", "seconds"}
    assert report["eval"]["sets"]["again"]["shifted"] is True and "imagecorruptions" in report["eval"]["frost"]


def test_errors_say_what_to_do(digits_test):
    model = build_timm(TimmConfig(name="test_resnet", num_classes=10)).eval()
    with pytest.raises(ValueError, match="mark exactly one"):
        benchmark(model, _sets(digits_test, shifted=True), progress=False)
    with pytest.raises(ValueError, match="pass a torch module"):
        benchmark({"m": 3}, _sets(digits_test), progress=False)
    with pytest.raises(ValueError, match=r"needs models with 10 classes, but 'five' \(5\)"):
        benchmark({"five": build_timm(TimmConfig(name="test_resnet", num_classes=5))}, _sets(digits_test),
                  progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="not an export folder"):
        benchmark(str(digits_test), _sets(digits_test), progress=False)
