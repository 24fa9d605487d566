"""robust.models: input normalisation, timm builder/export, CLIP zero-shot teacher (tiny random configs)."""

from __future__ import annotations

import json

import open_clip
import pytest
import safetensors.torch
import timm
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from robust.models.clip_teacher import ClipTeacherConfig, build_clip_teacher, default_templates
from robust.models.normalize import NormalizedModel
from robust.models.timm_models import TimmConfig, build_timm, export_timm, is_timm_export, load_exported

torch.set_num_threads(1)


def test_normalized_model_normalizes_and_keeps_inner_state_dict():
    inner = nn.Conv2d(3, 2, 1)
    model = NormalizedModel(inner, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    x = torch.rand(2, 3, 4, 4)
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1), torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), inner((x - mean) / std))
    assert model.model is inner
    assert sorted(model.state_dict()) == ["model.bias", "model.weight"]  # statistics are not exported


def test_build_timm_normalizes_with_the_models_pretrained_cfg():
    torch.manual_seed(0)
    model = build_timm(TimmConfig(name="test_efficientnet", num_classes=5)).eval()
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), model.model((x - mean) / std))
    assert model(x).shape == (2, 5)


def test_build_timm_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"timm\.list_models"):
        build_timm(TimmConfig(name="resnet_that_does_not_exist"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_build_timm_loads_a_checkpoint(tmp_path, suffix):
    torch.manual_seed(0)
    cfg = TimmConfig(name="test_resnet", num_classes=4)
    source = build_timm(cfg).eval()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(source.model.state_dict(), str(path))
    else:
        torch.save({"state_dict": source.model.state_dict(), "epoch": 3}, path)
    torch.manual_seed(1)  # a different init, overwritten by the checkpoint
    loaded = build_timm(TimmConfig(name="test_resnet", num_classes=4, checkpoint=str(path))).eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(x), source(x))


def test_build_timm_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build_timm(TimmConfig(name="test_resnet", num_classes=4, checkpoint=str(tmp_path / "missing.pth")))
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file(build_timm(TimmConfig(name="test_vit", num_classes=4)).model.state_dict(), str(path))
    with pytest.raises(ValueError, match=r"missing keys \['conv1"):
        build_timm(TimmConfig(name="test_resnet", num_classes=4, checkpoint=str(path)))
    with pytest.raises(ValueError, match="size mismatch"):
        build_timm(TimmConfig(name="test_vit", num_classes=7, checkpoint=str(path)))


def test_build_timm_refuses_pickled_objects(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": {}, "callback": nn.ReLU()}, path)  # an arbitrary object, not a tensor
    with pytest.raises(ValueError, match="more than tensors"):
        build_timm(TimmConfig(name="test_resnet", num_classes=4, checkpoint=str(path)))


def test_export_is_timms_folder_with_the_models_preprocessing(tmp_path):
    torch.manual_seed(0)
    cfg = TimmConfig(name="test_vit", num_classes=6, img_size=32)
    model = NormalizedModel(build_timm(cfg).model, mean=(0.2, 0.3, 0.4), std=(0.6, 0.7, 0.8)).eval()
    assert export_timm(model, cfg, tmp_path / "vit") == tmp_path / "vit"
    assert sorted(p.name for p in (tmp_path / "vit").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "vit" / "config.json").read_text())
    assert (config["architecture"], config["num_classes"]) == ("test_vit", 6)
    assert config["model_args"]["img_size"] == [32, 32]
    pretrained = config["pretrained_cfg"]
    assert pretrained["mean"] == [0.2, 0.3, 0.4] and pretrained["std"] == [0.6, 0.7, 0.8]
    assert pretrained["input_size"] == [3, 32, 32]  # the ViT's img_size, not timm's default of 160
    assert pretrained["interpolation"] == "bicubic" and pretrained["crop_pct"] == 0.95  # timm's, nothing given
    x = torch.rand(3, 3, 32, 32)
    for source in (tmp_path / "vit", f"local-dir:{tmp_path / 'vit'}"):
        loaded = load_exported(source).eval()
        assert torch.equal(loaded(x), model(x))
        assert loaded.mean.tolist() == model.mean.tolist() and loaded.std.tolist() == model.std.tolist()
    # the weights are the inner timm model's own state_dict
    plain = timm.create_model("test_vit", num_classes=6, img_size=32).eval()
    plain.load_state_dict(safetensors.torch.load_file(str(tmp_path / "vit" / "model.safetensors")))
    mean, std = torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1), torch.tensor([0.6, 0.7, 0.8]).view(1, 3, 1, 1)
    assert torch.equal(plain((x - mean) / std), model(x))


def test_export_records_the_data_config_given(tmp_path):
    cfg = TimmConfig(name="test_resnet", num_classes=10)
    data = {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bilinear", "crop_mode": "center"}
    export_timm(build_timm(cfg), cfg, tmp_path, data_config=data)
    pretrained = json.loads((tmp_path / "config.json").read_text())["pretrained_cfg"]
    assert {k: pretrained[k] for k in data} == {**data, "input_size": [3, 32, 32]}
    assert pretrained["mean"] == [0.5, 0.5, 0.5]  # timm's for test_resnet, as build_timm normalised
    with pytest.raises(ValueError, match="mean/std"):
        export_timm(build_timm(cfg), cfg, tmp_path / "x", data_config={"mean": (0.0, 0.0, 0.0)})
    with pytest.raises(ValueError, match="the config names 'test_vit'"):
        export_timm(build_timm(cfg), TimmConfig(name="test_vit", num_classes=10), tmp_path / "x")


def test_build_timm_loads_an_export_folder_and_checks_it_fits(tmp_path):
    torch.manual_seed(0)
    cfg = TimmConfig(name="test_vit", num_classes=4, img_size=32)
    source = NormalizedModel(build_timm(cfg).model, mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1)).eval()
    export_timm(source, cfg, tmp_path / "export")
    assert is_timm_export(tmp_path / "export") and is_timm_export(f"local-dir:{tmp_path / 'export'}")
    assert not is_timm_export(tmp_path) and not is_timm_export(tmp_path / "export" / "model.safetensors")
    torch.manual_seed(1)  # a different init, overwritten by the export
    loaded = build_timm(TimmConfig(name="test_vit", num_classes=4, checkpoint=str(tmp_path / "export"),
                                   drop_path_rate=0.1)).eval()  # fmt: skip
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(x), source(x))  # the export's weights and its mean/std
    for wrong, field in ((dict(num_classes=5), "num_classes"), (dict(img_size=64), "img_size"),
                         (dict(name="test_resnet"), "name")):  # fmt: skip
        bad = TimmConfig(**{"name": "test_vit", "num_classes": 4, "checkpoint": str(tmp_path / "export"), **wrong})
        with pytest.raises(ValueError, match=f"another model: .*'{field}'"):
            build_timm(bad)
    with pytest.raises(ValueError, match="not a timm export"):
        load_exported(tmp_path)


TINY_CLIP = "robust-test-tiny-clip"
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CLASSES = ["cat", "dog", "school bus"]
TEMPLATES = ["a photo of a {}.", "a blurry drawing of the {}."]


@pytest.fixture(scope="module")
def tiny_clip_cfg(tmp_path_factory) -> ClipTeacherConfig:
    path = tmp_path_factory.mktemp("clip") / f"{TINY_CLIP}.json"
    path.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(path)  # a random-weight architecture; no download anywhere
    return ClipTeacherConfig(
        arch=TINY_CLIP, pretrained="", class_names=CLASSES, templates=TEMPLATES, cache_dir=str(path.parent / "cache")
    )


def test_clip_teacher_logits_match_hand_computation(tiny_clip_cfg):
    torch.manual_seed(0)
    teacher = build_clip_teacher(tiny_clip_cfg)
    clip, tokenizer = teacher.clip, open_clip.get_tokenizer(TINY_CLIP)
    with torch.no_grad():
        columns = []
        for name in CLASSES:  # embed every template, L2-normalise, average, L2-normalise again
            e = clip.encode_text(tokenizer([t.format(name) for t in TEMPLATES]))
            e = (e / e.norm(dim=-1, keepdim=True)).mean(0)
            columns.append(e / e.norm())
        W_DK = torch.stack(columns, dim=1)
        x = torch.rand(4, 3, 32, 32)
        f = clip.encode_image((x - torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) /
                              torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1))  # fmt: skip
        expected = clip.logit_scale.exp() * (f / f.norm(dim=-1, keepdim=True)) @ W_DK
        logits, features = teacher.logits_and_features(x)
    torch.testing.assert_close(teacher.class_embeddings_DK, W_DK, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(4))
    assert logits.shape == (4, 3)


def test_clip_teacher_is_frozen_but_differentiable_in_the_input(tiny_clip_cfg):
    torch.manual_seed(0)
    teacher = build_clip_teacher(tiny_clip_cfg).train()  # stays in eval mode regardless
    assert not teacher.training and not teacher.clip.training
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.rand(2, 3, 48, 48, requires_grad=True)  # resized to 32 inside
    torch.nn.functional.cross_entropy(teacher(x), torch.tensor([0, 2])).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_clip_class_embeddings_are_cached(tiny_clip_cfg):
    torch.manual_seed(1)
    first = build_clip_teacher(tiny_clip_cfg)
    torch.manual_seed(1)  # the same weights: the cache answers
    second = build_clip_teacher(tiny_clip_cfg)
    assert not first.cache_hit and second.cache_hit
    assert torch.equal(first.class_embeddings_DK, second.class_embeddings_DK)
    torch.manual_seed(2)  # other text weights: a stale matrix must not be read
    assert not build_clip_teacher(tiny_clip_cfg).cache_hit


def test_clip_teacher_config_errors(tiny_clip_cfg):
    from dataclasses import replace

    with pytest.raises(ValueError, match="placeholder"):
        build_clip_teacher(replace(tiny_clip_cfg, templates=["a photo"]))
    with pytest.raises(ValueError, match="neither an open_clip tag"):
        build_clip_teacher(replace(tiny_clip_cfg, pretrained="/no/such/weights.bin"))
    with pytest.raises(ValueError, match="list_models"):
        build_clip_teacher(replace(tiny_clip_cfg, arch="ViT-Tiny-Unknown"))


def test_default_templates_are_openais_80_as_format_strings():
    templates = default_templates()
    assert len(templates) == 80 and all(t.count("{}") == 1 for t in templates)
    assert templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."
