"""Evaluation-set loaders on tiny folder trees: labels, numeric sorting, layouts, errors, end to end."""

from __future__ import annotations

import io
import pkgutil
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image
from torchvision.transforms import v2

from robust.config import load_config
from robust.data.shards import make_sample, write_shards
from robust.eval.class_subsets import IMAGENET_A_INDICES, IMAGENET_R_INDICES, OBJECTNET_GROUPS
from robust.eval.corruptions import _REGISTRY
from robust.eval.evaluate import evaluate_set
from robust.eval.sets import (
    EvalSetConfig,
    build_eval_set,
    corrupted_batches,
    in_distribution,
    resize_crop,
    timm_data_config,
)

torch.manual_seed(0)
WNIDS = [line for line in pkgutil.get_data("timm.data", "_info/imagenet_synsets.txt").decode().split()]


def _png(path: Path, rgb=(255, 0, 0), size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    return path


def _cfg(kind: str, root: Path, **kw) -> EvalSetConfig:
    return EvalSetConfig(kind=kind, root=str(root), **{"image_size": 8, "crop_pct": 1.0, **kw})


def _labels_by_folder(eval_set) -> dict[str, int]:
    return {path.parent.name: label for path, label, _ in eval_set.dataset.samples}


def test_subset_lists_match_timm_and_objectnet_has_113_classes():
    for name, ours in (("imagenet_r", IMAGENET_R_INDICES), ("imagenet_a", IMAGENET_A_INDICES)):
        timm_list = [int(v) for v in pkgutil.get_data("timm.data", f"_info/{name}_indices.txt").decode().split()]
        assert list(ours) == timm_list and len(ours) == 200
    assert len(OBJECTNET_GROUPS) == 113 and sum(map(len, OBJECTNET_GROUPS.values())) == 125
    assert OBJECTNET_GROUPS["alarm_clock"] == (409, 530)  # analog clock, digital clock


def test_imagefolder_labels_follow_sorted_then_numeric_names(tmp_path):
    for name in ("b", "a"):
        _png(tmp_path / "words" / name / "x.png")
    assert _labels_by_folder(build_eval_set(_cfg("imagefolder", tmp_path / "words"))) == {"a": 0, "b": 1}
    for name in ("10", "2", "1"):
        _png(tmp_path / "nums" / name / "x.png")
    assert _labels_by_folder(build_eval_set(_cfg("imagefolder", tmp_path / "nums"))) == {"1": 0, "2": 1, "10": 2}


def test_v2_folder_name_is_the_class_index(tmp_path):
    for name in ("0", "2", "10", "999"):
        _png(tmp_path / name / "a.jpeg")
    eval_set = build_eval_set(_cfg("imagenet-v2", tmp_path))
    labels = {int(eval_set.dataset[i][1]) for i in range(len(eval_set.dataset))}
    assert _labels_by_folder(eval_set) == {"0": 0, "2": 2, "10": 10, "999": 999} and labels == {0, 2, 10, 999}
    x, _ = eval_set.dataset[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 8, 8)  # resized and center-cropped


def test_imagenet_r_and_a_labels_are_subset_positions(tmp_path):
    for kind, indices in (("imagenet-r", IMAGENET_R_INDICES), ("imagenet-a", IMAGENET_A_INDICES)):
        root = tmp_path / kind
        for pos in (0, 5, 199):
            _png(root / WNIDS[indices[pos]] / "x.jpg")
        eval_set = build_eval_set(_cfg(kind, root))
        assert sorted(_labels_by_folder(eval_set).values()) == [0, 5, 199]
        assert eval_set.groups == tuple((i,) for i in indices)


def test_sketch_uses_imagenet_indices(tmp_path):
    for i in (0, 1, 537):
        _png(tmp_path / WNIDS[i] / "s.JPEG")
    assert sorted(_labels_by_folder(build_eval_set(_cfg("imagenet-sketch", tmp_path))).values()) == [0, 1, 537]


def test_objectnet_keeps_the_overlap_classes_and_crops_the_border(tmp_path):
    _png(tmp_path / "images" / "wok" / "1.png", size=(12, 12))
    _png(tmp_path / "images" / "alarm_clock" / "2.png", size=(12, 12))
    _png(tmp_path / "images" / "squeegee" / "3.png")  # not an ImageNet class: not scored
    im = Image.new("RGB", (12, 12), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 12, 2))  # a 2-px red band at the top edge
    im.save(tmp_path / "images" / "wok" / "1.png")
    eval_set = build_eval_set(_cfg("objectnet", tmp_path))
    names = sorted(OBJECTNET_GROUPS)
    assert _labels_by_folder(eval_set) == {"alarm_clock": names.index("alarm_clock"), "wok": names.index("wok")}
    assert len(eval_set.groups) == 113 and eval_set.groups[names.index("alarm_clock")] == (409, 530)
    wok = next(i for i, (p, _, _) in enumerate(eval_set.dataset.samples) if p.parent.name == "wok")
    x, _ = eval_set.dataset[wok]
    assert x[0].max() == 0 and x[2].min() == 255  # the red border band is gone


def test_imagenet_c_is_not_resized_and_yields_corruption_and_severity(tmp_path):
    _png(tmp_path / "fog" / "3" / WNIDS[7] / "a.png", size=(20, 16))
    _png(tmp_path / "gaussian_noise" / "1" / WNIDS[2] / "b.png", size=(20, 16))
    eval_set = build_eval_set(_cfg("imagenet-c", tmp_path))
    items = sorted(eval_set.dataset[i][1:] for i in range(2))
    assert items == [(2, "gaussian_noise", 1), (7, "fog", 3)]
    assert eval_set.dataset[0][0].shape == (3, 16, 20)  # as stored: no resize, no crop


def test_imagenet_p_sequences(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (5, 6, 7, 3), dtype=np.uint8)
    (tmp_path / "rotate" / WNIDS[3]).mkdir(parents=True)
    np.save(tmp_path / "rotate" / WNIDS[3] / "seq0.npy", frames)
    x, label, perturbation = build_eval_set(_cfg("imagenet-p", tmp_path)).dataset[0]
    assert x.shape == (5, 3, 6, 7) and label == 3 and perturbation == "rotate"
    assert torch.equal(x[2].permute(1, 2, 0), torch.from_numpy(frames[2]))


@pytest.mark.parametrize(
    ("kind", "folder", "expected"),
    [
        ("imagenet-c", "foo/3/n01440764", "root/<corruption>/<1..5>/<wnid>/<image>"),
        ("imagenet-c", "fog/high/n01440764", "root/<corruption>/<1..5>/<wnid>/<image>"),
        ("imagenet-v2", "cat", "root/<0..999>/<image>"),
        ("imagenet-r", WNIDS[0], "root/<wnid>/<image> with the subset's wnids"),  # index 0 is not in -R
        ("imagenet-sketch", "dog", "root/<wnid>/<image>"),
        ("objectnet", "images/not_a_class", "root/[images/]<objectnet folder"),
        ("imagenet-p", "rotate/dog", "root/<perturbation>/<wnid>/<sequence>.npy"),
    ],
)
def test_wrong_layout_names_the_expected_layout_and_what_was_found(tmp_path, kind, folder, expected):
    _png(tmp_path / folder / "x.png")
    with pytest.raises(ValueError) as err:
        build_eval_set(_cfg(kind, tmp_path))
    found = Path(folder).parts[-1] if kind != "imagenet-c" else Path(folder).parts[0 if "foo" in folder else 1]
    assert expected in str(err.value) and found in str(err.value)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown eval set kind"):
        build_eval_set(_cfg("imagenet-x", tmp_path))
    with pytest.raises(ValueError, match="is not a folder"):
        build_eval_set(_cfg("imagenet-v2", tmp_path / "missing"))
    _png(tmp_path / "a" / "x.png")
    with pytest.raises(ValueError, match="unknown corruptions"):
        build_eval_set(_cfg("imagefolder", tmp_path, corruptions=["fogg"]))
    with pytest.raises(ValueError, match="image_size"):
        load_config(EvalSetConfig, overrides=["image_size=big"])
    cfg = load_config(EvalSetConfig, overrides=["kind=imagenet-v2", "severities=[1,3]"])
    assert cfg.kind == "imagenet-v2" and cfg.severities == [1, 3] and cfg.shifted  # shifted unless marked
    _png(tmp_path / "c" / "fog" / "3" / WNIDS[0] / "x.png")
    with pytest.raises(ValueError, match="cannot be the in-distribution test set"):
        build_eval_set(_cfg("imagenet-c", tmp_path / "c", shifted=False))


def test_the_in_distribution_set_is_the_one_marked_not_shifted(tmp_path):
    _png(tmp_path / "a" / "x.png")
    clean, other = (build_eval_set(_cfg("imagefolder", tmp_path, name=n, shifted=n != "test")) for n in ("test", "r"))
    assert in_distribution([other, clean]) is clean
    for sets in ([other], [clean, clean]):
        with pytest.raises(ValueError, match="mark exactly one"):
            in_distribution(sets)


@pytest.mark.parametrize(("image_size", "crop_pct"), [(224, 0.875), (224, 0.9), (32, 1.0), (288, 0.95)])
def test_clean_preprocessing_resizes_like_timms_eval_transform(image_size, crop_pct):
    cfg = EvalSetConfig(image_size=image_size, crop_pct=crop_pct)
    ours = [t for t in resize_crop(cfg).transforms if isinstance(t, v2.Resize)]
    timms = [t for t in timm.data.create_transform(**timm_data_config(cfg)).transforms
             if type(t).__name__ == "Resize"]  # fmt: skip
    assert len(ours) == len(timms) == 1 and ours[0].size == [timms[0].size]  # 224 / 0.9: 248, not round()'s 249
    x = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    assert resize_crop(cfg)(x).shape == (3, image_size, image_size)


def _red_green_folder(root: Path) -> None:
    # Class folder "0" holds red images, "1" green; one green image is misfiled under "0".
    for i in range(3):
        _png(root / "0" / f"r{i}.png", (255, 0, 0))
        _png(root / "1" / f"g{i}.png", (0, 255, 0))
    _png(root / "0" / "wrong.png", (0, 255, 0))


def _channel_model(x_BCHW: torch.Tensor) -> torch.Tensor:
    assert x_BCHW.is_floating_point() and float(x_BCHW.max()) <= 1.0  # the model receives [0, 1] floats
    return x_BCHW.mean(dim=(2, 3))


def test_evaluate_set_end_to_end_on_a_folder_and_on_shards(tmp_path):
    _red_green_folder(tmp_path / "folder")
    tally = evaluate_set(_channel_model, build_eval_set(_cfg("imagefolder", tmp_path / "folder", name="clean")),
                         batch_size=3)  # fmt: skip
    assert tally.accuracy("clean") == 6 / 7
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 255, 0)).save(buf, format="PNG")
    samples = [make_sample(f"{i:03d}", buf.getvalue(), label) for i, label in enumerate([1, 1, 0, 1])]
    write_shards(samples, tmp_path / "shards", class_names=["0", "1", "2"])
    tally = evaluate_set(_channel_model, build_eval_set(_cfg("shards", tmp_path / "shards", name="s")), batch_size=2)
    assert tally.accuracy("s") == 3 / 4


def _sequence(colors: str) -> np.ndarray:
    rgb = {"r": (255, 0, 0), "g": (0, 255, 0)}
    return np.stack([np.full((4, 4, 3), rgb[c], dtype=np.uint8) for c in colors])


def test_evaluate_set_on_imagenet_p_with_sequence_lengths_per_perturbation(tmp_path):
    for perturbation, colors in (("rotate", "rgr"), ("gaussian_noise", "rrgr")):
        (tmp_path / perturbation / WNIDS[0]).mkdir(parents=True)
        np.save(tmp_path / perturbation / WNIDS[0] / "0.npy", _sequence(colors))
    tally = evaluate_set(_channel_model, build_eval_set(_cfg("imagenet-p", tmp_path)), batch_size=8)
    assert tally.flip_probability(("flip", "rotate")) == 2 / 2  # consecutive frames: r->g, g->r
    assert tally.flip_probability(("flip", "gaussian_noise")) == 1 / 3  # against the first frame: r, g, r


@pytest.mark.skipif("contrast" not in _REGISTRY, reason="contrast corruption not registered yet")
def test_corrupted_batches_yield_every_corruption_and_severity(tmp_path):
    x, y = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8), torch.tensor([0, 1])
    out = list(corrupted_batches([(x, y), (x, y)], corruptions=["contrast"], severities=[1, 4]))
    assert [(c, s) for _, _, c, s in out] == [("contrast", 1), ("contrast", 4)] * 2
    assert all(xc.is_floating_point() and xc.shape == (2, 3, 8, 8) for xc, *_ in out)
