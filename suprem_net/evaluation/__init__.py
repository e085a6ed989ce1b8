"""Evaluation: DSC and normalized surface Dice per case and class (``suprem_evaluate``)."""
from suprem_net.evaluation.metrics import dice, normalized_surface_dice

__all__ = ["dice", "normalized_surface_dice"]
