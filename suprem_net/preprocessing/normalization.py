"""Intensity normalisation schemes, one per channel, parameters from the plan.

- ``ct``: clip to the dataset's foreground 0.5/99.5 percentiles, then z-score with the
  foreground mean and std (nnU-Net's CTNormalization).
- ``window``: clip to a fixed HU window and scale linearly to ``range`` (SuPreM presets:
  -175..250 -> 0..1, as MONAI's ScaleIntensityRanged with clip=True).
- ``zscore``: per-image mean and std (non-CT channels).
"""
from __future__ import annotations

import numpy as np


def normalize(channel: np.ndarray, scheme: dict) -> np.ndarray:
    x = channel.astype(np.float32, copy=False)
    kind = scheme["scheme"]
    if kind == "ct":
        lo, hi = scheme["clip"]
        x = np.clip(x, lo, hi)
        return ((x - scheme["mean"]) / max(scheme["std"], 1e-8)).astype(np.float32)
    if kind == "window":
        lo, hi = scheme["window"]
        a, b = scheme.get("range", [0.0, 1.0])
        x = np.clip(x, lo, hi)
        return ((x - lo) / (hi - lo) * (b - a) + a).astype(np.float32)
    if kind == "zscore":
        return ((x - x.mean()) / max(float(x.std()), 1e-8)).astype(np.float32)
    raise ValueError(f"unknown normalisation scheme {kind!r}")
