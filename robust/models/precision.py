"""Mixed precision of the frozen models on the teacher pool: teacher logits, the DAD attack, the VQGAN.

One policy string, passed to each call: "auto" (bf16 on CUDA, fp32 elsewhere), "bf16" or "fp32".
bf16 is ``torch.autocast(device.type, dtype=torch.bfloat16)`` around the forward (the backward then
follows the dtypes the forward recorded). Weights stay fp32 and autocast casts them per op, so one
fp32 model serves either policy. Where bf16 would be wrong the code opts out locally: the VQGAN's
nearest-code search (``VQGAN.encode``), the CLIP head's scaled cosine (``ClipTeacher``), the
attack's step, projection and clipping (``pgd``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PRECISIONS = ("auto", "bf16", "fp32")


def check_precision(precision: str, *, key: str = "precision") -> None:
    """Raise ``ValueError`` for a policy string that is not one of ``PRECISIONS``, naming the config ``key``."""
    if precision not in PRECISIONS:
        raise ValueError(f"{key}={precision!r} is unknown; use one of {PRECISIONS} ('auto': bf16 on CUDA, "
                         "fp32 on CPU)")  # fmt: skip


def autocast_dtype(precision: str, *, device: torch.device | str) -> torch.dtype:
    """The compute dtype of ``precision`` on ``device``: bf16 or fp32 ("auto": bf16 on CUDA only)."""
    check_precision(precision)
    if precision == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def autocast(precision: str, *, device: torch.device | str) -> torch.autocast:
    """The autocast context of ``precision`` on ``device`` (disabled for fp32)."""
    bf16 = autocast_dtype(precision, device=device) == torch.bfloat16
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


def teacher_logits(model: nn.Module, x_BCHW: Tensor, *, precision: str = "auto") -> Tensor:
    """fp32 logits of a frozen model under ``precision``, without autograd."""
    with torch.no_grad(), autocast(precision, device=x_BCHW.device):
        return model(x_BCHW).float()
