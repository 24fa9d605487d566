"""DeepAugment copies of a training set (SPEC 6), generated once by the teacher pool for every job that
trains on them: the robust teacher (extra samples) and RPT (part of its augmented data).

The image-to-image network is ``DeepAugConfig.checkpoint``'s autoencoder, else one trained briefly on the
first ``fit_images`` crops of the set. ``copies`` copies of the set are written as extra shards: copy c of
a sample is its epoch-c crop through autoencoders perturbed afresh per ``images_per_copy`` images, drawn
from the batch's seeds (so no two actors repeat a network), keyed ``copy_key(c, key)``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster.engine import batch as B
from cluster.engine.pools import TeacherPoolConfig
from cluster.engine.prepare import Augment
from cluster.engine.runner import check_path
from cluster.engine.streams import count_samples, generate_once, sample_stream, write_generated
from cluster.engine.teacher_pool import through_pool
from robust.deepaugment import DOWNSAMPLE, DeepAugConfig, autoencoder_for, build_autoencoder, deepaugment
from robust.seeding import combine
from robust.train_transforms import TrainAugConfig

_COPY_KEY = re.compile(r"da\d+-")


def copy_key(copy: int, key: str) -> str:
    """The key of copy ``copy`` of the sample ``key``."""
    return f"da{copy}-{key}"


def is_copy(keys: np.ndarray) -> np.ndarray:
    """Which keys name a DeepAugment copy (``copy_key``); the generation refuses originals named like one."""
    return np.array([bool(_COPY_KEY.match(str(k))) for k in keys], dtype=bool)


@dataclass
class DeepAugmentProducer:
    """The teacher pool's work: the DeepAugment images of a batch of crops, under their copy keys."""

    state: dict[str, torch.Tensor]  # the autoencoder's weights
    cfg: DeepAugConfig

    def build(self, device: torch.device) -> Any:
        net = build_autoencoder(dataclasses.replace(self.cfg, checkpoint=None))
        net.load_state_dict(self.state)
        return net.to(device).eval()

    def produce(self, net: Any, batch: dict[str, np.ndarray], *, device: torch.device) -> dict:
        if is_copy(batch[B.KEY]).any():  # a reader could not tell this original from a copy
            key = batch[B.KEY][is_copy(batch[B.KEY])][0]
            raise ValueError(f"sample key {key!r} has the form of a DeepAugment copy's key (da<copy>-<key>); "
                             "rename the sample in the training shards")
        x = torch.from_numpy(np.ascontiguousarray(batch[B.IMAGE])).permute(0, 3, 1, 2)
        out = deepaugment(x, net, self.cfg, generator=torch.Generator().manual_seed(combine(batch[B.SEED])))
        # copy c of a sample is its epoch-c crop
        return {B.IMAGE: out.permute(0, 2, 3, 1), B.KEY: [copy_key(e, k) for e, k in zip(batch[B.EPOCH], batch[B.KEY])]}


def check_deepaugment(cfg: DeepAugConfig, fit_images: int, *, crop_size: int, key: str, fit_key: str) -> None:
    """What can fail before Ray starts, naming the config keys (``key`` holds ``cfg``, ``fit_key`` the count)."""
    check_path(cfg.checkpoint, key=f"{key}.checkpoint", what="an autoencoder state_dict")
    if cfg.copies < 1 or fit_images < 1:
        raise ValueError(f"{key}.copies ({cfg.copies}) and {fit_key} ({fit_images}) must be >= 1")
    if crop_size % DOWNSAMPLE:
        raise ValueError(f"augment.crop_size={crop_size}: DeepAugment's autoencoder needs a multiple of {DOWNSAMPLE}")


def deepaugment_shards(source: str, out: Path, *, cfg: DeepAugConfig, crop: TrainAugConfig, fit_images: int,
                       seed: int, classes: int, pool: TeacherPoolConfig) -> Path:
    """``cfg.copies`` DeepAugment copies of the shard set ``source`` (its ``crop``s), generated into ``out``
    by the teacher pool the first time only (``generate_once``)."""
    crops = Augment(crop, classes)

    def make() -> int:
        fit = sample_stream(source, crops, epochs=1, seed=seed, batch_size=pool.batch_size, num_classes=classes,
                            shuffle=False)
        x_fit = fit.take_batch(fit_images)[B.IMAGE]
        net = autoencoder_for(torch.from_numpy(np.array(x_fit)).permute(0, 3, 1, 2), cfg)
        copies = sample_stream(source, crops, epochs=cfg.copies, seed=seed, batch_size=cfg.images_per_copy * 4,
                               num_classes=classes)
        stream = through_pool(copies, DeepAugmentProducer(net.state_dict(), cfg), pool)
        return write_generated(stream, out, columns=[B.IMAGE], desc="DeepAugment", num_classes=classes,
                               total=cfg.copies * count_samples(source))

    return generate_once(out, make)
