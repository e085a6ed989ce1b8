"""Multi-label (overlapping) labels stored as a bitmask label map.

Format (``dataset.json["label_encoding"] == "bitmask"``): one integer volume per case in
which bit ``c - 1`` is set where class ``c`` (``labels`` name -> 1..C) is present; a voxel
can carry several classes, 0 is "no class". The dtype is the smallest unsigned integer that
holds C bits: uint8 (C <= 8), uint16 (<= 16), uint32 (<= 32). See docs/multilabel.md.

Resampling works per class: each bit is a binary mask interpolated linearly (nearest along
a separate low-resolution z axis) and thresholded at 0.5 (nnU-Net's rule for labels).
"""
from __future__ import annotations

import numpy as np
import torch

from suprem_net.errors import SupremError

BITMASK = "bitmask"
MAX_CLASSES = 32
PACK_BITS = 16  # training batches carry the bitmask as 16-bit channels: exact in float32 augmentation


def is_bitmask(spec_or_plan: dict) -> bool:
    """True for a dataset.json or plan whose labels are a bitmask (multi-label)."""
    return spec_or_plan.get("label_encoding") == BITMASK


def bitmask_dtype(num_classes: int) -> np.dtype:
    if num_classes < 1 or num_classes > MAX_CLASSES:
        raise SupremError(f"a bitmask label map holds 1 to {MAX_CLASSES} classes, got {num_classes}")
    for dt in (np.uint8, np.uint16, np.uint32):
        if num_classes <= np.iinfo(dt).bits:
            return np.dtype(dt)
    raise AssertionError  # unreachable


def encode(masks: dict[int, np.ndarray], shape, num_classes: int) -> np.ndarray:
    """Bitmask of ``{class number (1..C): bool mask}``."""
    dt = bitmask_dtype(num_classes)
    out = np.zeros(shape, dtype=dt)
    for c, m in masks.items():
        out[np.asarray(m, dtype=bool)] |= dt.type(1 << (int(c) - 1))
    return out


def channel(seg: np.ndarray, c: int) -> np.ndarray:
    """Bool mask of class ``c`` (1-based) in bitmask ``seg``."""
    return (np.asarray(seg).astype(np.uint64) >> np.uint64(c - 1)) & np.uint64(1) == 1


def class_counts(seg: np.ndarray, num_classes: int) -> list[int]:
    """Voxels per class 1..C (a voxel counts for every class whose bit is set)."""
    flat = np.asarray(seg).reshape(-1).astype(np.uint64)
    return [int(np.count_nonzero((flat >> np.uint64(c)) & np.uint64(1))) for c in range(num_classes)]


def value_problem(seg: np.ndarray, num_classes: int) -> str | None:
    """Why ``seg`` is not a valid bitmask of ``num_classes`` classes, or None."""
    if np.issubdtype(seg.dtype, np.floating):
        if not np.array_equal(seg, np.round(seg)):
            return "bitmask label has non-integer values"
    if seg.size and float(seg.min()) < 0:
        return "bitmask label has negative values"
    if seg.size and int(seg.max()) >= (1 << num_classes):
        return (f"bitmask label value {int(seg.max())} sets bits above the {num_classes} classes of dataset.json "
                f"(values must be OR-combinations of 2^(class-1))")
    return None


def resample_bitmask(seg: np.ndarray, new_shape, z_axis: int | None, num_classes: int) -> np.ndarray:
    """Resample a bitmask (Z, Y, X) class by class (linear, > 0.5); returns the same dtype."""
    from suprem_net.preprocessing.resampling import _resize

    if tuple(seg.shape) == tuple(new_shape):
        return seg
    dt = bitmask_dtype(num_classes)
    src = torch.from_numpy(np.ascontiguousarray(seg).astype(np.int64))
    out = torch.zeros(tuple(int(s) for s in new_shape), dtype=torch.int64)
    with torch.no_grad():
        for c in range(num_classes):
            mask = (src >> c) & 1
            if not bool(mask.any()):
                continue
            m = _resize(mask[None].float(), new_shape, "linear", z_axis)[0]
            out |= (m > 0.5).long() << c
    return out.numpy().astype(dt)


def class_locations(seg: np.ndarray, num_classes: int, max_per_class: int = 1000,
                    seed: int = 1234) -> dict[str, list[list[int]]]:
    """Up to ``max_per_class`` voxel coordinates (z, y, x) per class ("1".."C") for oversampling."""
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


def pack16(seg: np.ndarray, num_classes: int) -> np.ndarray:
    """(B, 1, ...) bitmask -> (B, ceil(C/16), ...) int32 channels of 16 bits each."""
    s = np.asarray(seg).astype(np.int64)
    n = -(-num_classes // PACK_BITS)
    return np.concatenate([(s >> (PACK_BITS * i)) & 0xFFFF for i in range(n)], axis=1).astype(np.int32)


def unpack16(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, ceil(C/16), ...) packed channels -> (B, C, ...) float 0/1 multi-hot target."""
    t = target.round().long() if target.is_floating_point() else target.long()
    chans = [(t[:, c // PACK_BITS] >> (c % PACK_BITS)) & 1 for c in range(num_classes)]
    return torch.stack(chans, 1).float()


def annotated_classes(all_classes: dict[str, int], missing: list[str] | None) -> list[int]:
    """Class numbers (1..) annotated in a case: every class except the names in ``missing``."""
    missing = set(missing or [])
    unknown = missing - set(all_classes)
    if unknown:
        raise SupremError(f"dataset.json partial_labels names unknown classes: {', '.join(sorted(unknown))}")
    return sorted(int(v) for n, v in all_classes.items() if int(v) > 0 and n not in missing)
