"""The read tasks' CPU work shared by the jobs: the student's training augmentation of each sample and the
batch's mixing (``robust.train_transforms``), as the ``Prepare`` of ``cluster.engine.streams``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cluster.engine import batch as B
from robust.seeding import combine
from robust.train_transforms import TrainAugConfig, augment_image, mix_batch, sample_transform


@dataclass
class Augment:
    """Per sample: crop, flip, RandAugment, random erasing; per batch: mixup / CutMix + label smoothing
    over the real rows (placeholders are left out of the mixing). Columns: ``image`` (+ ``target``)."""

    cfg: TrainAugConfig
    num_classes: int

    def __call__(self, images: list[np.ndarray], labels: np.ndarray, seeds: np.ndarray,
                 valid: np.ndarray) -> dict[str, np.ndarray]:
        if not hasattr(self, "_transform"):  # built once per read task, not per batch
            self._transform = sample_transform(self.cfg)
        x = np.stack([augment_image(im, self._transform, seed=int(s)) for im, s in zip(images, seeds)])
        if not self.cfg.soft_targets:
            return {B.IMAGE: x}
        target = np.zeros((len(x), self.num_classes), np.float32)
        if valid.any():
            x[valid], target[valid] = mix_batch(x[valid], labels[valid], self.cfg, num_classes=self.num_classes,
                                                seed=combine(seeds[valid]))
        return {B.IMAGE: x, B.TARGET: target}
