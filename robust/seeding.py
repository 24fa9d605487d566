"""Randomness drawn from what a sample is, never from where it is processed.

A run's augmentation of a sample is a function of (run seed, epoch, sample key) only, so any worker or
actor that handles the sample (or redoes it after a failure) draws the same crop, flip and noise, and
every method trained with one seed sees the same pixels: their differences are paired.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import numpy as np
import torch

_MASK = (1 << 63) - 1  # seeds stay non-negative int64s (numpy, torch and Arrow all take them)


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & _MASK


def sample_seeds(seed: int, epochs: Sequence[int], keys: Sequence[str]) -> np.ndarray:
    """One int64 seed per sample from (run seed, its epoch, its key)."""
    return np.array([_hash(f"{seed}/{int(e)}/{k}") for e, k in zip(epochs, keys, strict=True)], dtype=np.int64)


def combine(seeds: Sequence[int] | np.ndarray) -> int:
    """One seed for a whole batch (mixup pairs, DAD random starts), from its samples' seeds in order."""
    return _hash("/".join(str(int(s)) for s in seeds))


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators, which timm's and torchvision's transforms use."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)
