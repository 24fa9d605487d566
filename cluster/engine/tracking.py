"""Experiment tracking: TensorBoard event files by default, Weights & Biases when asked.

Each trained model gets its TensorBoard run, ``<model dir>/tensorboard`` (so ``tensorboard --logdir
runs/`` lists one run per model and job), with the rows of its metrics.jsonl under ``train/`` and its
evaluation under ``eval/``; a cached stage (the local teacher, the VQGAN) gets one under its stage
directory. W&B (``logging.wandb=true``) receives the same values, one W&B run per tracked run, grouped by
the job's run name; ``logging.wandb_mode=offline`` writes it locally for a later ``wandb sync``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

TENSORBOARD = "tensorboard"


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "robust-distill"
    wandb_entity: str = ""  # "": the W&B default entity of the logged-in user
    wandb_tags: list[str] = field(default_factory=list)
    wandb_mode: str = "online"  # online | offline (write locally, `wandb sync` later) | disabled


def check_logging(cfg: LoggingConfig) -> None:
    if cfg.wandb_mode not in ("online", "offline", "disabled"):
        raise ValueError(f"logging.wandb_mode must be online, offline or disabled, got {cfg.wandb_mode!r}")
    if cfg.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("logging.wandb=true needs the wandb package: pip install wandb") from None


class Tracker:
    """One tracked run (a model, or a stage): ``log(values, step)`` writes its numeric values."""

    def __init__(self, cfg: LoggingConfig, folder: Path, *, name: str, group: str) -> None:
        self.tensorboard = SummaryWriter(str(folder / TENSORBOARD)) if cfg.tensorboard else None
        self.wandb = None
        if cfg.wandb:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity or None, tags=list(cfg.wandb_tags),
                                    name=name, group=group, dir=str(folder), mode=cfg.wandb_mode, reinit="create_new")

    def log(self, values: Mapping[str, Any], *, step: int, prefix: str) -> None:
        scalars = {f"{prefix}/{k}": float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, global_step=step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
