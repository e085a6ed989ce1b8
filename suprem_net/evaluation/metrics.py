"""Overlap and surface metrics for binary masks: Dice (DSC) and normalized surface Dice (NSD).

Conventions (see docs/evaluation.md):

* **Both masks empty** -> ``NaN`` for DSC and NSD (as nnU-Net and MONAI's NSD do); such
  cases are left out of means computed with ``np.nanmean``.
* **Exactly one mask empty** -> ``0.0`` for DSC and NSD (a false-positive prediction for an
  absent organ is penalised, a missed organ too).
* **Surface** of a mask = ``mask XOR binary_erosion(mask)`` with the 3D 6-neighbourhood
  (face-connected) structuring element and ``border_value=0``, so a foreground voxel on the
  image border counts as surface. This is exactly MONAI's ``get_mask_edges`` with
  ``use_subvoxels=False``.
* **Distances** are exact Euclidean distances in mm between voxel centres
  (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``); a surface voxel is
  "within tolerance" when its distance to the other surface is ``<= tolerance_mm``.

Both functions accept masks of any dimensionality; ``spacing`` has one entry per axis in
array order (``(z, y, x)`` for arrays from :func:`suprem_net.io.image.read_image`).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

__all__ = ["dice", "normalized_surface_dice", "surface_voxels", "bounding_box", "union_slices"]


def _as_bool(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    return mask if mask.dtype == bool else mask.astype(bool)


def dice(pred_mask: np.ndarray, ref_mask: np.ndarray) -> float:
    """Dice similarity coefficient ``2 TP / (2 TP + FP + FN)`` of two binary masks.

    Returns ``NaN`` when both masks are empty (nnU-Net's convention; excluded from
    ``nanmean``) and ``0.0`` when exactly one of them is empty.
    """
    pred, ref = _as_bool(pred_mask), _as_bool(ref_mask)
    if pred.shape != ref.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {ref.shape}")
    tp = int(np.count_nonzero(pred & ref))
    n_pred = int(np.count_nonzero(pred))
    n_ref = int(np.count_nonzero(ref))
    denom = n_pred + n_ref  # = 2 TP + FP + FN
    if denom == 0:
        return float("nan")
    return 2.0 * tp / denom


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Tight bounding box of the nonzero voxels as slices (None when the mask is empty)."""
    mask = _as_bool(mask)
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other)) if other else np.flatnonzero(mask)
        if idx.size == 0:
            return None
        out.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(out)


def union_slices(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None, shape: Sequence[int],
                 margin: int = 1) -> tuple[slice, ...] | None:
    """Smallest box holding boxes ``a`` and ``b`` (either may be None), grown by ``margin``
    voxels on every side and clipped to ``shape``."""
    boxes = [s for s in (a, b) if s is not None]
    if not boxes:
        return None
    out = []
    for axis, size in enumerate(shape):
        lo = min(s[axis].start for s in boxes) - margin
        hi = max(s[axis].stop for s in boxes) + margin
        out.append(slice(max(lo, 0), min(hi, int(size))))
    return tuple(out)


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Boolean surface of ``mask``: ``mask XOR erosion(mask)`` with the face-connected
    (6-neighbourhood in 3D) structuring element; voxels on the array border are surface."""
    mask = _as_bool(mask)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, border_value=0)


def normalized_surface_dice(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float],
                            tolerance_mm: float = 1.0) -> float:
    """Normalized surface Dice at ``tolerance_mm`` (Nikolov et al. 2021, voxel-count version).

    ``NSD = (|S_p within tol of S_r| + |S_r within tol of S_p|) / (|S_p| + |S_r|)`` where
    ``S_p``, ``S_r`` are the surface voxels (:func:`surface_voxels`) of prediction and
    reference and distances are Euclidean in mm (``spacing`` per array axis).

    Returns ``NaN`` when both masks are empty and ``0.0`` when exactly one is empty.

    Speed: everything is computed inside the bounding box of both masks grown by one voxel
    (clipped to the array). This is exact, not an approximation: every surface voxel lies
    inside the box, so the distance from any voxel in it to the nearest surface voxel is
    unchanged, and the one-voxel rim keeps the erosion identical to the full-array one.
    """
    pred, ref = _as_bool(pred_mask), _as_bool(ref_mask)
    if pred.shape != ref.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {ref.shape}")
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=float), (pred.ndim,)))
    if any(s <= 0 or not np.isfinite(s) for s in spacing):
        raise ValueError(f"spacing must be positive and finite, got {spacing}")
    if not np.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be finite and >= 0, got {tolerance_mm}")

    box = union_slices(bounding_box(pred), bounding_box(ref), pred.shape, margin=1)
    if box is None:
        return float("nan")
    pred, ref = pred[box], ref[box]
    if not pred.any() or not ref.any():
        return 0.0

    surf_p = surface_voxels(pred)
    surf_r = surface_voxels(ref)
    n_p = int(np.count_nonzero(surf_p))
    n_r = int(np.count_nonzero(surf_r))
    # distance from every voxel of the box to the nearest surface voxel of the other mask
    dist_to_r = ndimage.distance_transform_edt(~surf_r, sampling=spacing)
    good_p = int(np.count_nonzero(dist_to_r[surf_p] <= tolerance_mm))
    del dist_to_r
    dist_to_p = ndimage.distance_transform_edt(~surf_p, sampling=spacing)
    good_r = int(np.count_nonzero(dist_to_p[surf_r] <= tolerance_mm))
    return (good_p + good_r) / (n_p + n_r)
