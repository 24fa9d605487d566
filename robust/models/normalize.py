"""Input normalisation: every model in the project takes RGB images in [0, 1] and normalises inside."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def normalize_images(x_BCHW: torch.Tensor, mean_C: torch.Tensor, std_C: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per channel; differentiable w.r.t. ``x_BCHW``."""
    return (x_BCHW - mean_C.view(1, -1, 1, 1)) / std_C.view(1, -1, 1, 1)


class NormalizedModel(nn.Module):
    """``model`` preceded by mean/std normalisation, so it takes [0, 1] input.

    The statistics are non-persistent buffers: ``state_dict()`` holds only ``model.*`` keys and
    ``self.model.state_dict()`` is the inner model's own, exportable as is.
    """

    def __init__(self, model: nn.Module, *, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} need one value per channel each")
        self.model = model
        self.register_buffer("mean", torch.tensor(tuple(mean), dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(tuple(std), dtype=torch.float32), persistent=False)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.model(normalize_images(x_BCHW, self.mean, self.std))
