"""Shared fixtures: a small real Ray cluster and small digits shards (one corrupt sample)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

N_SMALL = 192  # digits in the small training shard set


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the session: 4 logical CPUs, 2 teacher and 2 student slots."""
    import ray

    ray.init(address="local", num_cpus=4, resources={"teacher": 2, "student": 2}, object_store_memory=400 * 2**20,
             include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _png(x_HWC: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x_HWC).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory):
    """N_SMALL digits (32 px) in 3 shards (and the same in 25 small ones), plus one sample with
    undecodable image bytes."""
    from robust.data.digits import digits_arrays
    from robust.data.shards import make_sample, write_shards

    x, y, x_test, y_test = digits_arrays()
    root = tmp_path_factory.mktemp("shards")
    samples = [make_sample(f"d{i:04d}", _png(x[i]), int(y[i])) for i in range(N_SMALL)]
    samples.insert(50, make_sample("corrupt", b"\x89PNG\r\n\x1a\nthis is not an image", 3))
    write_shards(samples, root / "train", prefix="train", max_per_shard=70, num_classes=10)
    write_shards(samples, root / "train_fine", prefix="train", max_per_shard=8, num_classes=10)  # 25 shards
    test = [make_sample(f"t{i:04d}", _png(x_test[i]), int(y_test[i])) for i in range(96)]
    write_shards(test, root / "test", prefix="test", max_per_shard=50, num_classes=10)
    return {"train": root / "train", "train_fine": root / "train_fine", "test": root / "test",
            "keys": [s["__key__"] for s in samples]}
