import dataclasses
import itertools
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robust.augment import jsd_loss_fn
from robust.cache import cache_dir_for
from robust.config import load_config
from robust.data.digits import digits_arrays
from robust.deepaugment import DeepAugConfig
from robust.models.timm_models import TimmConfig, build_timm
from robust.pixmix import MixingSetConfig, PixMixConfig, load_mixing_set
from robust.teacher_train import (
    AUGMENTATIONS,
    TeacherTrainConfig,
    cached_teacher,
    robust_teacher_loss,
    teacher_batch,
    teacher_training_set,
    train_robust_teacher,
)

torch.set_num_threads(1)  # a shared 2-core machine: more OpenMP threads only spin

# small and fast: a 30-step autoencoder for DeepAugment, 16 fractals to mix with
FAST = dict(
    epochs=3, batch_size=32, warmup_steps=1, seed=3,
    deepaugment=DeepAugConfig(width=8, latent_channels=8, train_steps=30, batch_size=32),
    pixmix=PixMixConfig(k=2, mixing=MixingSetConfig(num_images=16)),
)
COMBINATIONS = [list(c) for n in (1, 2, 3) for c in itertools.combinations(AUGMENTATIONS, n)]


@pytest.fixture(scope="module")
def digits_subset():
    x_train, y_train, _, _ = digits_arrays()
    return x_train[:64], y_train[:64]


def _seed(s):
    random.seed(s)
    np.random.seed(s)


def _loss_on_fixed_batch(model, x_NHWC, y_N, cfg):
    """The training loss on one seeded batch of the subset, BN in batch-statistics mode as in training."""
    _seed(99)
    mixing = load_mixing_set(cfg.pixmix.mixing, size=(32, 32)) if "pixmix" in cfg.augmentations else None
    batch = teacher_batch(x_NHWC, y_N, cfg, mixing_M3HW=mixing, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        return robust_teacher_loss(model.train(), batch, cfg).item()


def test_default_is_augmix_plus_deepaugment_and_the_list_is_checked():
    assert TeacherTrainConfig().augmentations == ["augmix", "deepaugment"]
    cfg = load_config(TeacherTrainConfig, overrides=["augmentations=[pixmix,augmix]", "pixmix.k=2"])
    assert cfg.augmentations == ["pixmix", "augmix"] and cfg.pixmix.k == 2
    x, y = np.zeros((64, 32, 32, 3), np.uint8), np.zeros(64, np.int64)
    for bad in (["augmix", "cutmix"], ["augmix", "augmix"]):
        with pytest.raises(ValueError, match="pick each at most once"):
            train_robust_teacher(x, y, TeacherTrainConfig(augmentations=bad), progress=False)


@pytest.mark.parametrize("augmentations", COMBINATIONS, ids="+".join)
def test_each_combination_trains_and_lowers_its_loss(digits_subset, augmentations):
    x, y = digits_subset
    cfg = TeacherTrainConfig(augmentations=augmentations, **FAST | dict(epochs=6))  # 12 steps, 24 with deepaugment
    torch.manual_seed(cfg.seed)  # the loop seeds before building the model, so this is its initialisation
    initial = build_timm(cfg.model)
    trained = train_robust_teacher(x, y, cfg, progress=False)
    assert not trained.training
    before, after = (_loss_on_fixed_batch(m, x, y, cfg) for m in (initial, trained))
    assert after < 0.85 * before, (before, after)


def test_augmix_training_is_deterministic_and_deepaugment_adds_samples(digits_subset):
    x, y = digits_subset
    cfg = TeacherTrainConfig(augmentations=["augmix"], **FAST)
    trained = train_robust_teacher(x, y, cfg, progress=False)
    again = train_robust_teacher(x, y, cfg, progress=False)
    for (name, a), b in zip(trained.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="batch_size"):
        train_robust_teacher(x[:8], y[:8], cfg, progress=False)

    assert teacher_training_set(x, y, cfg, progress=False)[0] is x
    da = dataclasses.replace(cfg, augmentations=["augmix", "deepaugment"])
    x_all, y_all = teacher_training_set(x, y, da, progress=False)
    assert x_all.shape == (128, 32, 32, 3) and np.array_equal(x_all[:64], x)
    np.testing.assert_array_equal(y_all, np.concatenate([y, y]))
    assert np.abs(x_all[64:].astype(int) - x).mean() > 5  # the DeepAugment copies differ from the originals


def test_teacher_batch_and_loss_per_combination(digits_subset):
    x, y = digits_subset[0][:8], digits_subset[1][:8]
    mixing = load_mixing_set(MixingSetConfig(num_images=4), size=(32, 32))
    model = build_timm(TimmConfig(name="test_resnet", num_classes=10)).eval()
    for augmentations in (["augmix"], ["pixmix"], ["deepaugment"], ["pixmix", "augmix"]):
        cfg = TeacherTrainConfig(augmentations=augmentations, **FAST)
        _seed(0)
        batch = teacher_batch(x, y, cfg, mixing_M3HW=mixing, generator=torch.Generator().manual_seed(0))
        jsd = "augmix" in augmentations
        assert batch["image"].shape == ((24 if jsd else 8), 3, 32, 32) and batch["label"].tolist() == y.tolist()
        assert batch["image"].min() >= 0 and batch["image"].max() <= 1
        clean = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
        first = batch["image"][:8]
        assert torch.equal(first, clean) == ("pixmix" not in augmentations)  # pixmix replaces the image
        with torch.no_grad():
            logits = model(batch["image"])
            loss_fn = jsd_loss_fn(cfg.augmix) if jsd else F.cross_entropy
            expected = loss_fn(logits, batch["label"])
            assert robust_teacher_loss(model, batch, cfg).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="mixing pictures"):
        teacher_batch(x, y, TeacherTrainConfig(augmentations=["pixmix"]), generator=torch.Generator())


def test_cached_teacher_trains_once_and_keys_on_the_config(tmp_path):
    # epochs=0 exports the seeded initialisation: the cache mechanics without the training time
    cfg = TeacherTrainConfig(model=TimmConfig(name="test_resnet", num_classes=10), epochs=0, seed=1,
                             augmentations=["augmix"])
    model, path = cached_teacher(tmp_path, cfg, progress=False)
    assert path == cache_dir_for(tmp_path, "timm-teacher", cfg) and path.name.startswith("timm-teacher-")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary directory left behind
    # a timm folder (config.json, model.safetensors) beside the cache's config.yaml
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "config.yaml", "model.safetensors"]
    pretrained = json.loads((path / "config.json").read_text())["pretrained_cfg"]
    assert (pretrained["input_size"], pretrained["crop_pct"]) == ([3, 32, 32], 1.0)  # the digits, as evaluated
    assert load_config(TeacherTrainConfig, yaml_path=path / "config.yaml") == cfg
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    torch.manual_seed(cfg.seed)
    for a, b in zip(model.state_dict().values(), build_timm(cfg.model).state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    mtime = (path / "model.safetensors").stat().st_mtime_ns
    model2, path2 = cached_teacher(tmp_path, cfg, progress=False)
    assert path2 == path and (path / "model.safetensors").stat().st_mtime_ns == mtime
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    other = dataclasses.replace(cfg, seed=2)
    model3, path3 = cached_teacher(tmp_path, other, progress=False)
    assert path3 != path and path3.is_dir() and (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert not torch.equal(model3.model.fc.weight, model.model.fc.weight)
    key = lambda c: cache_dir_for(tmp_path, "timm-teacher", c)  # noqa: E731
    assert key(TeacherTrainConfig(lr=1e-3)) != key(TeacherTrainConfig())
    assert key(TeacherTrainConfig(augmentations=["augmix"])) != key(TeacherTrainConfig())
    assert key(TeacherTrainConfig(deepaugment=DeepAugConfig(layers=1))) != key(TeacherTrainConfig())
