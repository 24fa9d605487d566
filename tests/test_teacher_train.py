import random

import numpy as np
import pytest
import torch

from robust.augment import augmix_batch, augmix_transform, jsd_loss_fn
from robust.config import load_config
from robust.data.digits import digits_arrays
from robust.models.timm_models import TimmConfig, build_timm
from robust.cache import cache_dir_for
from robust.teacher_train import TeacherTrainConfig, cached_teacher, train_augmix_teacher


@pytest.fixture(scope="module")
def digits_subset():
    x_train, y_train, _, _ = digits_arrays()
    return x_train[:64], y_train[:64]


def _jsd_on_fixed_views(model, x_NHWC, y_N, cfg):
    """The JSD loss on one seeded AugMix batch of the subset, BN in batch-statistics mode as in training."""
    random.seed(99)
    np.random.seed(99)
    x_3BCHW = augmix_batch(x_NHWC, augmix_transform(cfg.augmix))
    with torch.no_grad():
        return jsd_loss_fn(cfg.augmix)(model.train()(x_3BCHW), torch.as_tensor(y_N)).item()


def test_a_few_steps_reduce_the_jsd_loss_and_training_is_deterministic(digits_subset):
    x, y = digits_subset
    cfg = TeacherTrainConfig(epochs=3, batch_size=32, warmup_steps=1, seed=3)  # 6 steps
    torch.manual_seed(cfg.seed)  # the loop seeds before building the model, so this is its initialisation
    initial = build_timm(cfg.model)
    trained = train_augmix_teacher(x, y, cfg, progress=False)
    again = train_augmix_teacher(x, y, cfg, progress=False)
    assert not trained.training
    for (name, a), b in zip(trained.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    before, after = (_jsd_on_fixed_views(m, x, y, cfg) for m in (initial, trained))
    assert after < 0.8 * before, (before, after)

    with pytest.raises(ValueError, match="batch_size"):
        train_augmix_teacher(x[:8], y[:8], cfg, progress=False)


def test_cached_teacher_trains_once_and_keys_on_the_config(tmp_path):
    # epochs=0 exports the seeded initialisation: the cache mechanics without the training time
    cfg = TeacherTrainConfig(model=TimmConfig(name="test_resnet", num_classes=10), epochs=0, seed=1)
    model, path = cached_teacher(tmp_path, cfg, progress=False)
    assert path == cache_dir_for(tmp_path, "teacher", cfg) and path.name.startswith("teacher-")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary directory left behind
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "teacher.json", "teacher.safetensors"]
    assert load_config(TeacherTrainConfig, yaml_path=path / "config.yaml") == cfg
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    torch.manual_seed(cfg.seed)
    for a, b in zip(model.state_dict().values(), build_timm(cfg.model).state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    mtime = (path / "teacher.safetensors").stat().st_mtime_ns
    model2, path2 = cached_teacher(tmp_path, cfg, progress=False)
    assert path2 == path and (path / "teacher.safetensors").stat().st_mtime_ns == mtime
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    other = TeacherTrainConfig(model=TimmConfig(name="test_resnet", num_classes=10), epochs=0, seed=2)
    model3, path3 = cached_teacher(tmp_path, other, progress=False)
    assert path3 != path and path3.is_dir() and (path / "teacher.safetensors").stat().st_mtime_ns == mtime
    assert not torch.equal(model3.model.fc.weight, model.model.fc.weight)
    assert cache_dir_for(tmp_path, "teacher", TeacherTrainConfig(lr=1e-3)) != cache_dir_for(tmp_path, "teacher", TeacherTrainConfig())
