"""Where to cut a training patch: uniform or centred on a stored foreground voxel.

Foreground oversampling follows nnU-Net: a forced sample picks a random class present in
the case (from the stored ``class_locations``), then a random stored voxel of that class, and
centres the patch there; otherwise the centre is uniform over positions that keep the patch
inside the volume where the volume is large enough.
"""
from __future__ import annotations

import numpy as np


def foreground_center(props: dict, rng: np.random.Generator) -> list[int] | None:
    """A stored voxel of a random class present in the case, or ``None`` if it has no foreground."""
    locations = {k: v for k, v in (props.get("class_locations") or {}).items() if len(v)}
    if not locations:
        return None
    classes = sorted(locations, key=int)
    cls = classes[int(rng.integers(len(classes)))]
    voxels = locations[cls]
    return [int(v) for v in voxels[int(rng.integers(len(voxels)))]]


def random_center(shape, patch, rng: np.random.Generator) -> list[int]:
    """Uniform centre such that the patch stays inside the volume along every axis where it fits."""
    center = []
    for s, p in zip(shape, patch):
        lo, hi = p // 2, s - (p - p // 2)
        if hi < lo:  # volume smaller than the patch: centre it
            center.append(s // 2)
        else:
            center.append(int(rng.integers(lo, hi + 1)))
    return center


def patch_origin(center, size) -> list[int]:
    """Lower corner of a region of ``size`` centred on ``center``."""
    return [int(c) - int(s) // 2 for c, s in zip(center, size)]


def choose_region(props: dict, shape, patch, force_foreground: bool, rng: np.random.Generator) -> list[int]:
    """Lower corner of one sample's patch (before spatial augmentation, which turns about its centre)."""
    center = foreground_center(props, rng) if force_foreground else None
    if center is None:
        center = random_center(shape, patch, rng)
    return patch_origin(center, patch)


def forced_foreground(batch_size: int, fraction: float) -> list[bool]:
    """Which samples of a batch are forced to contain foreground: the last ``round(fraction * B)``,
    at least one when ``fraction > 0`` (nnU-Net's rule)."""
    n = int(round(batch_size * fraction))
    if fraction > 0:
        n = max(1, n)
    return [i >= batch_size - n for i in range(batch_size)]
