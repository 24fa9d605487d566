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
from robust.models.timm_models import TimmConfig, build_timm, export_timm, load_exported

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


def test_export_round_trips_and_plain_timm_rebuilds_it(tmp_path):
    torch.manual_seed(0)
    cfg = TimmConfig(name="test_vit", num_classes=6, img_size=32)
    model = build_timm(cfg).eval()
    weights = export_timm(model, cfg, tmp_path, stem="robust")
    meta = json.loads((tmp_path / "robust.json").read_text())
    assert weights == tmp_path / "robust.safetensors"
    assert meta["timm_name"] == "test_vit" and meta["num_classes"] == 6 and meta["input_size"] == [3, 32, 32]
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["std"] == [0.5, 0.5, 0.5]
    x = torch.rand(3, 3, 32, 32)
    for source in (tmp_path, weights, tmp_path / "robust.json"):
        assert torch.equal(load_exported(source, stem="robust").eval()(x), model(x))
    # without this project: timm + safetensors only
    plain = timm.create_model("test_vit", num_classes=6, img_size=32).eval()
    plain.load_state_dict(safetensors.torch.load_file(str(weights)))
    assert torch.equal(plain((x - 0.5) / 0.5), model(x))


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
