import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.auto_augment import augment_and_mix_transform

from robust.augment import AugMixConfig, augmix_batch, augmix_transform, augmix_views, jsd_loss_fn


def _image(seed=0, size=32):
    """A structured RGB uint8 image: colour gradients and a bright square."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, size, dtype=np.float32)
    img = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1),
                    np.full((size, size), 60.0)], axis=2)
    r, c = rng.integers(4, size - 12, 2)
    img[r:r + 8, c:c + 8] = 250
    return img.astype(np.uint8)


def _seed(s):
    random.seed(s)
    np.random.seed(s)


def test_views_shape_range_and_difference():
    _seed(0)
    img = _image()
    views = augmix_views(img, augmix_transform(AugMixConfig()))
    assert views.shape == (3, 3, 32, 32) and views.dtype == torch.float32
    assert views.min() >= 0 and views.max() <= 1
    torch.testing.assert_close(views[0], torch.from_numpy(img).permute(2, 0, 1).float() / 255)
    assert (views[1] - views[0]).abs().mean() > 0.01 and (views[2] - views[0]).abs().mean() > 0.01
    assert not torch.equal(views[1], views[2])
    with pytest.raises(ValueError, match="RGB"):
        augmix_views(img[..., 0], augmix_transform(AugMixConfig()))


def test_all_ops_matches_timms_own_parser_and_paper_ops_drop_colour():
    ours = augmix_transform(AugMixConfig(severity=3, width=3, depth=-1, alpha=1.0, all_ops=True))
    timms = augment_and_mix_transform("augmix-m3-w3-a1", dict(translate_pct=0.3, img_mean=(128, 128, 128)))
    assert [op.name for op in ours.ops] == [op.name for op in timms.ops]
    pil = Image.fromarray(_image(1))
    _seed(5)
    a = np.asarray(ours(pil))
    _seed(5)
    b = np.asarray(timms(pil))
    np.testing.assert_array_equal(a, b)
    paper = {op.name for op in augmix_transform(AugMixConfig()).ops}
    assert len(paper) == 9 and not paper & {"ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                                            "SharpnessIncreasing"}
    with pytest.raises(ValueError):
        augmix_transform(AugMixConfig(depth=0))


def test_batch_is_split_major():
    images = np.stack([_image(i) for i in range(4)])
    transform = augmix_transform(AugMixConfig())
    _seed(7)
    batch = augmix_batch(images, transform)
    assert batch.shape == (12, 3, 32, 32)
    _seed(7)
    per_image = [augmix_views(img, transform) for img in images]
    for i, views in enumerate(per_image):
        for split in range(3):
            torch.testing.assert_close(batch[split * 4 + i], views[split])


def test_jsd_loss_matches_hand_formula():
    torch.manual_seed(0)
    n, k = 4, 6
    logits = torch.randn(3 * n, k) * 2
    y = torch.randint(0, k, (n,))
    loss_fn = jsd_loss_fn(AugMixConfig())
    probs = [torch.softmax(part.double(), 1) for part in logits.split(n)]
    mixture = torch.stack(probs).mean(0)
    js = sum((p * (p.log() - mixture.log())).sum(1).mean() for p in probs) / 3
    ce = F.cross_entropy(logits[:n].double(), y)
    assert loss_fn(logits, y).item() == pytest.approx((ce + 12 * js).item(), rel=1e-5)
    assert loss_fn(logits, y) > ce + 0.1
    same = logits[:n].repeat(3, 1)
    assert loss_fn(same, y).item() == pytest.approx(F.cross_entropy(logits[:n], y).item(), abs=1e-5)
