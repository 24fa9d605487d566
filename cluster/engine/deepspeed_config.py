"""The student pool's optimisation config and the DeepSpeed config generated from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class OptimConfig:
    """AdamW with a linear warm-up then a cosine decay, run by DeepSpeed ZeRO on each student worker."""

    zero_stage: int = 2
    micro_batch_size: int = 64  # per worker, per micro-step
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # 0 disables clipping
    warmup_epochs: float = 1.0  # linear warm-up from warmup_start_ratio * lr
    warmup_start_ratio: float = 0.0
    min_lr_ratio: float = 0.01  # where the cosine ends
    ema_decay: float = 0.0  # 0 disables the EMA of weights (timm's ModelEmaV3); needs ZeRO stage < 3


def validate_optim(cfg: OptimConfig) -> None:
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"optim.zero_stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    if cfg.micro_batch_size < 1 or cfg.grad_accum < 1:
        raise ValueError("optim.micro_batch_size and optim.grad_accum must be >= 1")
    if cfg.lr <= 0 or cfg.warmup_epochs < 0 or not 0 <= cfg.warmup_start_ratio <= 1 or not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError("optim.lr must be > 0, optim.warmup_epochs >= 0, optim.warmup_start_ratio and "
                         "optim.min_lr_ratio in [0, 1]")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"optim.ema_decay must be in [0, 1), got {cfg.ema_decay}")
    if cfg.ema_decay and cfg.zero_stage == 3:
        raise ValueError("optim.ema_decay needs full parameters on each worker: use zero_stage <= 2 with EMA")


def deepspeed_config(cfg: OptimConfig, *, world_size: int, total_steps: int, steps_per_epoch: int,
                     on_gpu: bool) -> dict[str, Any]:
    """DeepSpeed's JSON config: ZeRO stage, bf16 on GPU / fp32 on CPU, accumulation, clipping, AdamW, cosine."""
    validate_optim(cfg)
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": on_gpu},
        "zero_optimization": {"stage": cfg.zero_stage},
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW: DeepSpeed's fused CPU Adam would compile a C++ op on first use.
            "params": {"lr": cfg.lr, "betas": list(cfg.betas), "weight_decay": cfg.weight_decay, "torch_adam": True},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": max(total_steps, 1),
                "warmup_num_steps": min(round(cfg.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0)),
                "warmup_type": "linear",
                "warmup_min_ratio": cfg.warmup_start_ratio,
                "cos_min_ratio": cfg.min_lr_ratio,
            },
        },
        "steps_per_print": 10**9,  # progress comes from our metrics, not DeepSpeed's prints
    }
