"""Distillation losses and the student objectives."""

from robust.losses.kd import kd_loss, soft_ce
from robust.losses.objectives import ObjectiveConfig, objective

__all__ = ["ObjectiveConfig", "kd_loss", "objective", "soft_ce"]
