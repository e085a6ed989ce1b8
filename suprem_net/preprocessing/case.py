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
from suprem_net.preprocessing.body import BodyMask, is_ct
from suprem_net.preprocessing.normalization import POINTWISE, normalize
from suprem_net.preprocessing.resampling import resample_bitmask, resample_image, resample_labels, separate_z_axis
from suprem_net.timing import NO_TIMES, StageTimes


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


def _channels(images: list[np.ndarray]) -> np.ndarray:
    """(C, Z, Y, X) in the images' own dtype: a view of a single channel, else one stacked copy."""
    if len(images) == 1:
        return np.asarray(images[0])[None]
    return np.stack([np.asarray(im) for im in images])


def _normalised(data: np.ndarray, schemes: list[dict]) -> np.ndarray:
    if data.shape[0] == 1:
        return normalize(data[0], schemes[0])[None]
    out = np.empty(data.shape, dtype=np.float32)
    for c in range(data.shape[0]):
        out[c] = normalize(data[c], schemes[c])
    return out


def preprocess_case(images: list[np.ndarray], geometry: Geometry, plan: dict, seg: np.ndarray | None = None, *,
                    times: StageTimes = NO_TIMES, body: bool = False):
    """Return ``(data (C,Z,Y,X) float32, seg (Z,Y,X) or None, properties)`` for one case.

    ``images`` may have any numeric dtype and are never changed; reorientation and the crop are views.
    Pointwise normalisations (``ct``, ``window``) run chunk by chunk inside the first resampling pass,
    so no full-size float copy of the input is made (the same numbers as normalising first); z-score
    (statistics of the whole image) normalises the whole image first. ``body``: also put the
    :class:`~suprem_net.preprocessing.body.BodyMask` of the first channel into ``properties["body"]``
    (for CT plans; ``None`` otherwise). ``times`` receives the stages reorient, crop, normalise, resample."""
    with times("reorient"):
        data = _channels(images)
        spacing = list(geometry.spacing)
        transform = ori.orientation_transform(geometry.direction, plan.get("orientation"), ori.network_axes(plan))
        if transform is not None:
            data = ori.reorient(data, transform)
            seg = ori.reorient(seg, transform) if seg is not None else None
            spacing = ori.reorient_spacing(spacing, transform)
        oriented_shape = list(data.shape[1:])
    with times("crop"):
        bbox = nonzero_bbox(data)
        sl = tuple(slice(lo, hi) for lo, hi in bbox)
        data = data[(slice(None),) + sl]
        seg = seg[sl] if seg is not None else None
        mask = BodyMask.of(images[0], transform, bbox) if body and is_ct(plan["normalization"]) else None
    schemes = plan["normalization"]

    def normalised(rows: np.ndarray) -> np.ndarray:
        with times("normalise"):
            return _normalised(rows, schemes)

    pointwise = all(s["scheme"] in POINTWISE for s in schemes)
    if not pointwise:
        data = normalised(data)
    with times("resample"):
        target = plan["target_spacing"]
        new_shape = resampled_shape(data.shape[1:], spacing, target)
        z_axis = separate_z_axis(spacing, target, plan["resampling"]["anisotropy_threshold"])
        data = resample_image(data, new_shape, z_axis, prepare=normalised if pointwise else None)
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
    if body:
        props["body"] = mask
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
