"""The built-in real data set "digits": scikit-learn's 8x8 handwritten digits at 32x32 RGB.

Pixels 0..16 are scaled to uint8 (round(x * 255 / 16)), resized 8 -> 32 with PIL bicubic and repeated
to 3 channels. Split: ``train_test_split(test_size=0.25, random_state=0, stratify=y)``, giving
1347 train / 450 test images. Classes "0".."9".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from robust.data.shard_reader import verify_manifest
from robust.data.shards import encode_png, make_sample, write_shards

SIZE = 32
CLASS_NAMES = [str(i) for i in range(10)]
SPLITS = ("train", "test")


def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train_NHWC uint8, y_train int64, x_test_NHWC, y_test), deterministic."""
    # imported here: scikit-learn adds seconds to `import robust.data`, and only this function needs it
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_N88 = np.rint(digits.images * 255.0 / 16.0).astype(np.uint8)
    x_NHW = np.stack([np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.Resampling.BICUBIC)) for im in x_N88])
    x_NHWC = np.repeat(x_NHW[..., None], 3, axis=-1)
    y_N = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x_NHWC, y_N, test_size=0.25, random_state=0, stratify=y_N)
    return x_train, y_train, x_test, y_test


def build_digits_shards(out_dir: str | Path, *, max_per_shard: int = 128) -> dict[str, Path]:
    """Write ``out_dir/train`` and ``out_dir/test`` as PNG shards with manifests; a no-op when both
    manifests already exist and verify. Returns {"train": dir, "test": dir}.

    Ray Data streams a shard at a time (one read task per shard, and a teacher task emits its output
    when its input block is done), so shards of two teacher batches keep the local pipeline flowing:
    with 1000 per shard the students waited for 1000 DAD samples at a time."""
    dirs = {split: Path(out_dir) / split for split in SPLITS}
    try:
        for d in dirs.values():
            verify_manifest(d)
        return dirs
    except ValueError:
        pass  # missing or stale: rebuild both splits
    x_train, y_train, x_test, y_test = digits_arrays()
    for split, (x_NHWC, y_N) in zip(SPLITS, ((x_train, y_train), (x_test, y_test))):
        samples = (make_sample(f"{i:05d}", encode_png(x), int(y)) for i, (x, y) in enumerate(zip(x_NHWC, y_N)))
        write_shards(samples, dirs[split], prefix=f"digits-{split}", max_per_shard=max_per_shard,
                     class_names=CLASS_NAMES, overwrite=True)
    return dirs

