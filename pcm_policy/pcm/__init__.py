"""Picard Consistency Training: trajectory collection (`trajectories`) and the PCT loss (`loss`)."""

from .loss import iterate_variances, pct_loss
from .trajectories import collect_picard_trajectory

__all__ = ["collect_picard_trajectory", "iterate_variances", "pct_loss"]
