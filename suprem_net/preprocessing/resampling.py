"""Resampling in torch (multi-threaded, vectorised over classes), separable per axis.

Images: cubic convolution (Keys, a = -0.75; PyTorch's ``bicubic``) in-plane and along z,
or nearest along z when the data is anisotropic (nnU-Net's separate-z rule). nnU-Net uses
scikit-image's cubic B-spline (order 3); both are third-order interpolants, ours needs no
spline prefilter and runs on all cores, which is why it is not scipy/skimage.
Labels: each class's one-hot mask is interpolated linearly (nearest along z when
anisotropic) and every voxel takes the class with the largest value, so no label value
is ever invented (nnU-Net: order-1 per-class masks thresholded at 0.5). Multi-label bitmasks:
each class bit is a binary mask interpolated the same way and thresholded at 0.5 (nnU-Net's rule).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from suprem_net.labels import bitmask_dtype


def separate_z_axis(spacing, new_spacing, threshold: float = 3.0) -> int | None:
    """The single low-resolution axis to treat separately, or None (nnU-Net's rule)."""
    for sp in (spacing, new_spacing):
        sp = np.asarray(sp, dtype=float)
        if sp.max() / sp.min() > threshold:
            axes = np.flatnonzero(sp == sp.max())
            return int(axes[0]) if len(axes) == 1 else None
    return None


CHUNK_BYTES = 32 << 20  # the pieces resize_axis works in: a small fraction of a CT


def resize_axis(x, axis: int, size: int, mode: str, chunk_bytes: int | None = None, prepare=None) -> torch.Tensor:
    """Resize one spatial axis of ``x`` (N, Z, Y, X); ``mode`` is 'cubic', 'linear' or 'nearest'.

    The rows along ``axis`` are independent, so they are resized in chunks of about ``chunk_bytes``
    (default :data:`CHUNK_BYTES`) into one new contiguous tensor: the only full-size array made is the
    result. ``prepare`` turns each chunk of ``x`` into the float32 tensor to resize; ``x`` may then be
    any array that slices like a tensor (e.g. a numpy view of an int16 image), and its prepared whole
    is never made."""
    if x.shape[1 + axis] == size and prepare is None:
        return x
    shape = list(x.shape)
    shape[1 + axis] = size
    if prepare is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(shape, dtype=torch.float32)
    dim = 2 if axis == 0 else 1  # the outermost spatial axis that is not resized
    row_bytes = math.prod(x.shape) // x.shape[dim] * out.element_size()
    step = max(1, (chunk_bytes or CHUNK_BYTES) // max(1, row_bytes))
    for a in range(0, x.shape[dim], step):
        n = min(step, x.shape[dim] - a)
        rows = x[(slice(None),) * dim + (slice(a, a + n),)]
        out.narrow(dim, a, n).copy_(_resize_rows(rows if prepare is None else prepare(rows), axis, size, mode))
    return out


def _resize_rows(x: torch.Tensor, axis: int, size: int, mode: str) -> torch.Tensor:
    moved = x.movedim(1 + axis, -1)  # (N, a, b, L)
    lead = moved.shape[:-1]
    flat = moved.reshape(1, 1, -1, moved.shape[-1])  # (1, 1, rows, L): 2D op with rows unchanged
    if mode == "nearest":
        out = F.interpolate(flat, size=(flat.shape[2], size), mode="nearest-exact")
    else:
        out = F.interpolate(flat, size=(flat.shape[2], size), mode="bicubic" if mode == "cubic" else "bilinear",
                            align_corners=False)
    return out.reshape(*lead, size).movedim(-1, 1 + axis)


def resize(x, new_shape, mode: str, z_axis: int | None, prepare=None) -> torch.Tensor:
    """Resize ``x`` (N, Z, Y, X) to ``new_shape`` axis by axis; ``prepare``: see :func:`resize_axis`
    (applied in the first pass)."""
    # shrink first along the axis that reduces the data most, to keep intermediates small
    axes = [a for a in sorted(range(3), key=lambda a: new_shape[a] / x.shape[1 + a]) if x.shape[1 + a] != new_shape[a]]
    if prepare is not None and not axes:
        return prepare(x)
    for a in axes:
        x = resize_axis(x, a, int(new_shape[a]), "nearest" if a == z_axis else mode, prepare=prepare)
        prepare = None
    return x


def resample_image(data: np.ndarray, new_shape, z_axis: int | None, prepare=None) -> np.ndarray:
    """Resample ``data`` (C, Z, Y, X) to ``new_shape`` (Z, Y, X), float32. ``prepare`` (a numpy chunk of
    ``data`` -> its float32 values, e.g. a pointwise normalisation) runs chunk by chunk in the first
    pass, so ``data`` may be the raw image (any dtype, any strides) and no full-size float copy of it
    is made; the result is the same, bit for bit, as resampling ``prepare(data)``."""
    with torch.no_grad():
        if prepare is not None:
            out = resize(data, new_shape, "cubic", z_axis, prepare=lambda rows: torch.from_numpy(prepare(rows)))
            return out.numpy()
        if tuple(data.shape[1:]) == tuple(new_shape):
            return data.astype(np.float32, copy=False)
        out = resize(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), new_shape, "cubic", z_axis)
    return out.numpy()


def resample_labels(seg: np.ndarray, new_shape, z_axis: int | None, num_classes: int | None = None) -> np.ndarray:
    """Resample a label map (Z, Y, X) of integers 0..K-1; returns the same dtype."""
    if tuple(seg.shape) == tuple(new_shape):
        return seg
    k = int(seg.max()) + 1 if num_classes is None else num_classes
    best = torch.full(tuple(int(s) for s in new_shape), -1.0)
    out = torch.zeros(tuple(int(s) for s in new_shape), dtype=torch.int64)
    src = torch.from_numpy(np.ascontiguousarray(seg))
    with torch.no_grad():
        for c in range(k):
            mask = (src == c)
            if not bool(mask.any()):
                continue
            m = resize(mask[None].float(), new_shape, "linear", z_axis)[0]
            better = m > best
            best = torch.where(better, m, best)
            out[better] = c
    return out.numpy().astype(seg.dtype)


def resample_bitmask(seg: np.ndarray, new_shape, z_axis: int | None, num_classes: int) -> np.ndarray:
    """Resample a bitmask (Z, Y, X) class by class (linear, > 0.5); returns the same dtype."""
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
            m = resize(mask[None].float(), new_shape, "linear", z_axis)[0]
            out |= (m > 0.5).long() << c
    return out.numpy().astype(dt)
