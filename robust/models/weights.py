"""Strict state_dict loading with errors that say which keys disagree and what to check."""

from __future__ import annotations

import torch
from torch import nn


def load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str, hint: str) -> None:
    """``model.load_state_dict(state_dict)``, strictly; a mismatch is a ValueError naming ``source``."""
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{source} does not fit {type(model).__name__}: {err}; {hint}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{source} does not match {type(model).__name__}: missing keys {_preview(result.missing_keys)}, "
            f"unexpected keys {_preview(result.unexpected_keys)}; {hint}"
        )


def _preview(keys: list[str], n: int = 8) -> str:
    return str(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")
