"""From logits on the preprocessed grid back to the original image, and onto disk.

:func:`revert_logits` mirrors :func:`suprem_net.preprocessing.case.revert_labels`: resample
to the cropped grid (linear, nearest along a separate low-resolution axis: the same
separable torch resize as preprocessing), argmax, paste into the crop box (background
outside), undo the orientation. Memory stays bounded for large CTs: the logits are first
resized along the first array axis at the low in-plane resolution, then slab by slab
(``slab`` output planes at a time) in-plane, so at most K x slab x Y x X floats of the
original resolution exist at once. Separable linear/nearest interpolation is a tensor
product, so this order gives the same result as resizing the whole volume at once.

Probabilities (``--save-probabilities``) are the softmax of the resampled logits, stored as
float16 in an ``.npz`` (key ``probabilities``, shape (K, Z, Y, X) in the original geometry's
array order; outside the crop box background = 1) together with ``labels`` (class names).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from suprem_net.io.atomic import atomic_path
from suprem_net.io.image import Geometry, write_image
from suprem_net.preprocessing import orientation as ori
from suprem_net.preprocessing.resampling import resize_axis

logger = logging.getLogger(__name__)


def _mode(axis: int, z_axis: int | None) -> str:
    return "nearest" if axis == z_axis else "linear"


def resampled_slabs(logits: torch.Tensor, props: dict, slab: int = 16):
    """Yield ``(z slice in the oriented original grid, logits (K, dz, Y, X) float32)`` slab by slab.

    The first array axis is resized once at the low in-plane resolution, then each slab of
    ``slab`` planes in-plane, so at most K x slab x Y x X original-resolution floats exist at once.
    """
    target = [int(s) for s in props["shape_after_crop"]]
    z_axis = props["separate_z_axis"]
    z_start = props["bbox"][0][0]
    with torch.inference_mode():
        x = logits
        if x.shape[1] != target[0]:
            x = resize_axis(x.float(), 0, target[0], _mode(0, z_axis))
        for z0 in range(0, target[0], slab):
            part = x[:, z0:z0 + slab].float()
            part = resize_axis(part, 1, target[1], _mode(1, z_axis))
            part = resize_axis(part, 2, target[2], _mode(2, z_axis))
            yield slice(z_start + z0, z_start + z0 + part.shape[1]), part


def revert_logits(logits: torch.Tensor, props: dict, *, probabilities: bool = False,
                  slab: int = 16) -> tuple[np.ndarray, np.ndarray | None]:
    """Return ``(labels uint8 (Z,Y,X), probabilities float16 (K,Z,Y,X) or None)`` in the
    original image grid, for ``logits`` (K, z, y, x) on the preprocessed grid."""
    k = logits.shape[0]
    full = np.zeros(props["oriented_shape"], dtype=np.uint8)
    probs = None
    if probabilities:
        probs = np.zeros((k, *props["oriented_shape"]), dtype=np.float16)
        probs[0] = 1.0
    box = [slice(lo, hi) for lo, hi in props["bbox"]]
    for zs, part in resampled_slabs(logits, props, slab):
        full[zs, box[1], box[2]] = part.argmax(0).to(torch.uint8).cpu().numpy()
        if probs is not None:
            probs[:, zs, box[1], box[2]] = torch.softmax(part, 0).half().cpu().numpy()
    if props.get("orientation"):
        full = ori.restore(full, props["orientation"])
        if probs is not None:
            probs = ori.restore(probs, props["orientation"])
    return np.ascontiguousarray(full), (np.ascontiguousarray(probs) if probs is not None else None)


def write_labels(path: Path, labels: np.ndarray, geometry: Geometry) -> None:
    write_image(path, labels.astype(np.uint8, copy=False), geometry)


def write_per_organ(case_dir: Path, labels: np.ndarray, geometry: Geometry, class_names: dict[int, str]) -> None:
    """AbdomenAtlas layout: ``case_dir/segmentations/<class>.nii.gz`` (binary uint8) and
    ``case_dir/combined_labels.nii.gz`` (written last, so its presence means the case is done)."""
    for value, name in sorted(class_names.items()):
        if value == 0:
            continue
        write_image(case_dir / "segmentations" / f"{name}.nii.gz", (labels == value).astype(np.uint8), geometry)
    write_labels(case_dir / "combined_labels.nii.gz", labels, geometry)


def write_probabilities(path: Path, probs: np.ndarray, class_names: dict[int, str]) -> None:
    names = np.array([class_names.get(i, str(i)) for i in range(probs.shape[0])])
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, probabilities=probs, labels=names)
