"""Intensity normalisation schemes, one per channel, parameters from the plan.

- ``ct``: clip to the dataset's foreground 0.5/99.5 percentiles, then z-score with the
  foreground mean and std (nnU-Net's CTNormalization).
- ``window``: clip to a fixed HU window and scale linearly to ``range`` (SuPreM presets:
  -175..250 -> 0..1, as MONAI's ScaleIntensityRanged with clip=True).
- ``zscore``: per-image mean and std (non-CT channels).
"""
from __future__ import annotations

import numpy as np

# schemes that normalise each voxel on its own (no statistics of the image): they may run chunk by chunk
POINTWISE = ("ct", "window")


def normalize(channel: np.ndarray, scheme: dict) -> np.ndarray:
    """The normalised channel as a new C-ordered float32 array (``channel`` is never changed; any
    dtype). The arithmetic runs in place on that one copy, in the same order and precision as the
    expressions in the module docstring, so the results are those of the plain expressions."""
    kind = scheme["scheme"]
    if kind == "ct":
        lo, hi = scheme["clip"]
        x = np.array(channel, dtype=np.float32, order="C")
        np.clip(x, lo, hi, out=x)
        x -= scheme["mean"]
        x /= max(scheme["std"], 1e-8)
        return x
    if kind == "window":
        lo, hi = scheme["window"]
        a, b = scheme.get("range", [0.0, 1.0])
        x = np.array(channel, dtype=np.float32, order="C")
        np.clip(x, lo, hi, out=x)
        x -= lo
        x /= hi - lo
        x *= b - a
        x += a
        return x
    if kind == "zscore":
        x = np.array(channel, dtype=np.float32, order="C")
        mean, std = x.mean(), max(float(x.std()), 1e-8)
        x -= mean
        x /= std
        return x
    raise ValueError(f"unknown normalisation scheme {kind!r}")
