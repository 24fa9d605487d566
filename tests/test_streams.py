"""Prepared streams: one decode per row, placeholders that keep the epoch's count, and augmentation drawn
from (run seed, epoch, sample key) only, so every method and every rerun sees the same pixels."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import ray
from PIL import Image

from cluster.engine import batch as B
from cluster.engine.prepare import Augment
from cluster.engine.streams import generated_stream, sample_stream, write_generated
from robust.data.digits import digits_arrays
from robust.data.shards import make_sample, write_shards
from robust.train_transforms import TrainAugConfig

CROP = TrainAugConfig(crop_size=32, scale=[0.5, 1.0], ratio=[0.8, 1.25], hflip=0.5, interpolation="bilinear",
                      auto_augment="", color_jitter=0.0, re_prob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0)


def _encoded(x_HWC: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x_HWC).save(buf, format=fmt, quality=95)
    return buf.getvalue()


def _rows(ds: ray.data.Dataset) -> dict[tuple[int, str], dict]:
    return {(int(b[B.EPOCH][i]), str(b[B.KEY][i])): {c: b[c][i] for c in b}
            for b in ds.iter_batches(batch_size=None) for i in range(len(b[B.KEY]))}


def test_a_batch_that_mixes_png_and_jpeg_decodes_every_row(ray_cluster, tmp_path):
    # The RPT pool and the robust-teacher job picked one image column per batch: JPEG rows in a batch that
    # also held PNG rows were marked corrupt and dropped.
    x, y, _, _ = digits_arrays()
    samples = [make_sample(f"m{i}", _encoded(x[i], "JPEG" if i % 2 else "PNG"), int(y[i]),
                           image_field="jpg" if i % 2 else "png") for i in range(24)]
    write_shards(samples, tmp_path, max_per_shard=24, num_classes=10)
    rows = _rows(sample_stream(str(tmp_path), Augment(CROP, 10), epochs=1, seed=0, batch_size=24, num_classes=10))
    assert len(rows) == 24 and all(r[B.VALID] for r in rows.values())
    # the JPEG rows hold their own digits: each crop is close to its own image, far from its neighbour's
    full = TrainAugConfig(**{**CROP.__dict__, "scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip": 0.0})
    exact = _rows(sample_stream(str(tmp_path), Augment(full, 10), epochs=1, seed=0, batch_size=24, num_classes=10))
    for i in range(1, 24, 2):
        image = exact[(0, f"m{i}")][B.IMAGE].astype(float)
        assert np.abs(image - x[i]).mean() < 3 < np.abs(image - x[i - 1]).mean()


def test_bad_rows_become_placeholders_with_their_reason(ray_cluster, tmp_path):
    x, y, _, _ = digits_arrays()
    samples = [make_sample(f"g{i}", _encoded(x[i], "PNG"), int(y[i])) for i in range(6)]
    samples.append(make_sample("broken", b"\x89PNG\r\n\x1a\nnot an image", 1))
    write_shards(samples, tmp_path / "a", max_per_shard=10, num_classes=10)
    # a label the manifest's 10 classes do not hold (written as a 12-class set, read as 10 classes)
    write_shards([make_sample("far", _encoded(x[0], "PNG"), 11)], tmp_path / "b", num_classes=12)
    rows = _rows(sample_stream([str(tmp_path / "a"), str(tmp_path / "b")], Augment(CROP, 10), epochs=1, seed=0,
                               batch_size=8, num_classes=10))
    assert len(rows) == 8  # the epoch keeps every row
    bad = {k: str(r[B.SKIP_REASON]) for (_, k), r in rows.items() if not r[B.VALID]}
    assert set(bad) == {"broken", "far"}
    assert "undecodable image" in bad["broken"] and "label 11 is not in [0, 10)" in bad["far"]
    assert all(r[B.SKIP_REASON] == "" for (_, k), r in rows.items() if k not in bad)


def test_a_samples_augmentation_depends_on_seed_epoch_and_key_only(ray_cluster, small_shards):
    source = str(small_shards["train"])

    def run(seed: int, batch_size: int, shuffle: bool):
        return _rows(sample_stream(source, Augment(CROP, 10), epochs=2, seed=seed, batch_size=batch_size,
                                   num_classes=10, shuffle=shuffle))

    first, regrouped, other_seed = run(0, 64, True), run(0, 13, False), run(1, 64, True)
    assert first.keys() == regrouped.keys() == other_seed.keys()
    valid = [k for k, r in first.items() if r[B.VALID]]
    # other batches, another shard order: the same pixels for every (epoch, key)
    assert all(np.array_equal(first[k][B.IMAGE], regrouped[k][B.IMAGE]) for k in valid)
    # another seed, or the sample's next epoch, draws another crop
    assert np.mean([not np.array_equal(first[k][B.IMAGE], other_seed[k][B.IMAGE]) for k in valid]) > 0.9
    keys = [key for epoch, key in valid if epoch == 0]
    assert np.mean([not np.array_equal(first[(0, k)][B.IMAGE], first[(1, k)][B.IMAGE]) for k in keys]) > 0.9


def test_generated_shards_keep_the_mixed_images_soft_targets(ray_cluster, small_shards, tmp_path):
    # Offline DAD with mixup stores each mixed image with its soft label (it failed: no shard field for it).
    mixed = dataclasses.replace(CROP, mixup=0.8, label_smoothing=0.1)
    stream = sample_stream(str(small_shards["train"]), Augment(mixed, 10), epochs=1, seed=0, batch_size=32,
                           num_classes=10, shuffle=False)
    written = _rows(stream)
    n = write_generated(stream, tmp_path / "gen", columns=[B.IMAGE, B.TARGET], total=len(written), desc="test",
                        num_classes=10)
    back = _rows(generated_stream(tmp_path / "gen", columns=[B.IMAGE, B.TARGET], epochs=1, seed=0, batch_size=32))
    valid = [k for k, r in written.items() if r[B.VALID]]
    assert n == len(valid) == len(back) and len(valid) > 100
    for k in valid:
        assert np.array_equal(back[k][B.IMAGE], written[k][B.IMAGE])
        np.testing.assert_allclose(back[k][B.TARGET], written[k][B.TARGET], rtol=0, atol=0)
    targets = np.stack([back[k][B.TARGET] for k in valid])
    np.testing.assert_allclose(targets.sum(1), 1, atol=1e-6)
    assert (targets.max(1) < 0.95).mean() > 0.5  # mixed: most rows are no one-hot
