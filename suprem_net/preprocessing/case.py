"""One case through the plan's preprocessing: orient (and bring the axes into the order the network
sees, see :mod:`suprem_net.preprocessing.orientation`) -> crop to nonzero -> normalise -> resample.

The same code runs for training data (``suprem_plan_and_preprocess``) and at inference
(``suprem_predict``); :func:`revert_labels` undoes the geometric steps exactly.
"""
from __future__ import annotations

import numpy as np

from suprem_net.io.image import Geometry
from suprem_net.labels import LabelScheme
from suprem_net.preprocessing import orientation as ori
from suprem_net.preprocessing.normalization import normalize
from suprem_net.preprocessing.resampling import resample_bitmask, resample_image, resample_labels, separate_z_axis


def nonzero_bbox(data: np.ndarray) -> list[list[int]]:
    """Bounding box [[lo, hi), ...] of voxels that are nonzero in any channel of (C, Z, Y, X)."""
    mask = np.any(data != 0, axis=0)
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        box.append([int(hit[0]), int(hit[-1]) + 1] if len(hit) else [0, mask.shape[axis]])
    return box


def resampled_shape(shape, spacing, target_spacing) -> list[int]:
    return [max(1, int(round(s * sp / t))) for s, sp, t in zip(shape, spacing, target_spacing)]


def preprocess_case(images: list[np.ndarray], geometry: Geometry, plan: dict, seg: np.ndarray | None = None):
    """Return ``(data (C,Z,Y,X) float32, seg (Z,Y,X) or None, properties)`` for one case."""
    data = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    spacing = list(geometry.spacing)
    transform = ori.orientation_transform(geometry.direction, plan.get("orientation"), ori.network_axes(plan))
    if transform is not None:
        data = ori.reorient(data, transform)
        seg = ori.reorient(seg, transform) if seg is not None else None
        spacing = ori.reorient_spacing(spacing, transform)
    oriented_shape = list(data.shape[1:])
    bbox = nonzero_bbox(data)
    sl = tuple(slice(lo, hi) for lo, hi in bbox)
    data = data[(slice(None),) + sl]
    seg = seg[sl] if seg is not None else None
    data = np.stack([normalize(data[c], plan["normalization"][c]) for c in range(data.shape[0])])
    target = plan["target_spacing"]
    new_shape = resampled_shape(data.shape[1:], spacing, target)
    z_axis = separate_z_axis(spacing, target, plan["resampling"]["anisotropy_threshold"])
    data = resample_image(data, new_shape, z_axis)
    if seg is not None and LabelScheme.of(plan).multi_label:
        seg = resample_bitmask(seg, new_shape, z_axis, plan["num_classes"])
    elif seg is not None:
        seg = resample_labels(np.ascontiguousarray(seg), new_shape, z_axis, plan["num_classes"])
    props = {
        "geometry": geometry.to_dict(),
        "orientation": transform,  # orientation and axis order in one permutation with flips
        "axes": ori.network_axes(plan),
        "oriented_shape": oriented_shape,
        "oriented_spacing": spacing,
        "bbox": bbox,
        "shape_after_crop": [hi - lo for lo, hi in bbox],
        "shape_after_resample": new_shape,
        "separate_z_axis": z_axis,
    }
    return data, seg, props


def revert_labels(seg: np.ndarray, props: dict) -> np.ndarray:
    """Bring a label map from the preprocessed grid back to the original image grid."""
    seg = resample_labels(np.ascontiguousarray(seg), props["shape_after_crop"], props["separate_z_axis"])
    full = np.zeros(props["oriented_shape"], dtype=seg.dtype)
    full[tuple(slice(lo, hi) for lo, hi in props["bbox"])] = seg
    if props["orientation"]:
        full = ori.restore(full, props["orientation"])
    return np.ascontiguousarray(full)


def sample_class_locations(seg: np.ndarray, num_classes: int, max_per_class: int = 1000,
                           seed: int = 1234) -> dict[str, list[list[int]]]:
    """Up to ``max_per_class`` voxel coordinates (z, y, x) per foreground class, for oversampling."""
    rng = np.random.default_rng(seed)
    flat = np.flatnonzero(seg)
    values = seg.reshape(-1)[flat]
    order = np.argsort(values, kind="stable")
    flat, values = flat[order], values[order]
    bounds = np.searchsorted(values, np.arange(1, num_classes + 1))
    out: dict[str, list[list[int]]] = {}
    for c in range(1, num_classes):
        idx = flat[bounds[c - 1]:bounds[c]]
        if len(idx) == 0:
            continue
        if len(idx) > max_per_class:
            idx = np.sort(rng.choice(idx, max_per_class, replace=False))
        out[str(c)] = np.stack(np.unravel_index(idx, seg.shape), axis=1).astype(int).tolist()
    return out


def sample_bitmask_locations(seg: np.ndarray, num_classes: int, max_per_class: int = 1000,
                             seed: int = 1234) -> dict[str, list[list[int]]]:
    """Up to ``max_per_class`` voxel coordinates per class ("1".."C") of a bitmask, for oversampling."""
    rng = np.random.default_rng(seed)
    flat = np.asarray(seg).reshape(-1).astype(np.uint64)
    out: dict[str, list[list[int]]] = {}
    for c in range(num_classes):
        idx = np.flatnonzero((flat >> np.uint64(c)) & np.uint64(1))
        if len(idx) == 0:
            continue
        if len(idx) > max_per_class:
            idx = np.sort(rng.choice(idx, max_per_class, replace=False))
        out[str(c + 1)] = np.stack(np.unravel_index(idx, seg.shape), axis=1).astype(int).tolist()
    return out
