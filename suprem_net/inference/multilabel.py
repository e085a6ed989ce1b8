"""Prediction and export for multi-label (bitmask, sigmoid) models.

Each class is predicted independently: class c is present where sigmoid(logit_c) > 0.5, so
masks may overlap. Results come back in the original image grid, like
:func:`suprem_net.inference.export.revert_logits`: the logits (C, z, y, x), streamed from the
sliding window, are resized along the first array axis at the low in-plane resolution as they
arrive, then slab by slab in-plane (at most C x ``slab`` x Y x X floats of the original
resolution at once), thresholded, packed into a bitmask (bit c-1 = class c) and pasted into the
crop box; the orientation is undone last.

The combined label map gives every voxel the class with the highest probability among the
classes that pass 0.5 (0 where none does): the plain ``suprem_predict`` output and
``combined_labels.nii.gz`` of ``--per-organ``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from suprem_net.inference.export import REVERT_SLAB, resampled_slabs
from suprem_net.io.image import Geometry, write_image
from suprem_net.preprocessing import orientation as ori
from suprem_net.labels import LabelScheme, bitmask_dtype, channel
from suprem_net.timing import NO_TIMES, StageTimes

logger = logging.getLogger(__name__)


def combine(logits: torch.Tensor) -> torch.Tensor:
    """(C, ...) logits -> int64 label map: 1 + argmax over the classes with logit > 0, else 0."""
    passing = logits > 0
    best = logits.masked_fill(~passing, float("-inf")).argmax(0) + 1
    return torch.where(passing.any(0), best, torch.zeros_like(best))


def to_bitmask(logits: torch.Tensor) -> torch.Tensor:
    """(C, ...) logits -> int64 bitmask with bit c set where logit c > 0."""
    bits = torch.zeros(logits.shape[1:], dtype=torch.int64, device=logits.device)
    for c in range(logits.shape[0]):
        bits |= (logits[c] > 0).long() << c
    return bits


def revert_sigmoid(logits, props: dict, slab: int = REVERT_SLAB,
                   times: StageTimes = NO_TIMES) -> tuple[np.ndarray, np.ndarray]:
    """``(combined labels (Z,Y,X), bitmask (Z,Y,X))`` in the original grid for ``logits`` (C, z, y, x),
    whole or as slabs along the first axis (see :func:`~suprem_net.inference.export.resampled_slabs`)."""
    combined = bits = None
    box = [slice(lo, hi) for lo, hi in props["bbox"]]
    for zs, part in resampled_slabs(logits, props, slab, times):
        with times("revert"):
            if combined is None:
                c = part.shape[0]
                combined = np.zeros(props["oriented_shape"], dtype=np.uint8 if c < 256 else np.uint16)
                bits = np.zeros(props["oriented_shape"], dtype=bitmask_dtype(c))
            combined[zs, box[1], box[2]] = combine(part).cpu().numpy().astype(combined.dtype)
            bits[zs, box[1], box[2]] = to_bitmask(part).cpu().numpy().astype(bits.dtype)
    with times("revert"):
        if props.get("orientation"):
            combined = ori.restore(combined, props["orientation"])
            bits = ori.restore(bits, props["orientation"])
        return np.ascontiguousarray(combined), np.ascontiguousarray(bits)


def predict_multilabel(predictor, images: list[np.ndarray], geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """``(combined labels, bitmask)`` in ``geometry`` for one case with a multi-label predictor."""
    if not LabelScheme.of(predictor.plan).multi_label:
        raise ValueError("predict_multilabel needs a multi-label (bitmask) plan")
    data, props = predictor.preprocessed(images, geometry)
    return revert_sigmoid(predictor.logit_slabs(data, props), props, times=predictor.times)


def write_per_organ_bitmask(case_dir: Path, combined: np.ndarray, bits: np.ndarray, geometry: Geometry,
                            class_names: dict[int, str]) -> None:
    """``case_dir/segmentations/<class>.nii.gz`` from each class's own bit (overlaps kept), then
    ``case_dir/combined_labels.nii.gz`` (written last: its presence means the case is done)."""
    for value, name in sorted(class_names.items()):
        if value == 0:
            continue
        write_image(case_dir / "segmentations" / f"{name}.nii.gz", channel(bits, value).astype(np.uint8), geometry)
    write_image(case_dir / "combined_labels.nii.gz", combined, geometry)
