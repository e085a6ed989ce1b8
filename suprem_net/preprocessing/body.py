"""Where the body is in a CT, coarsely, so that prediction can leave out tiles that hold only air.

The mask is taken from the Hounsfield units before normalisation (pooled on the image as read, in its
own memory order, then mapped through the orientation and crop onto the grid that is predicted):

* a voxel is body where its HU is above ``BODY_HU`` (-500: between air at -1000 and fat at about
  -100; the scanner table counts as body, which only costs time);
* the mask is pooled into blocks of ``BLOCK``\\ :sup:`3` voxels (a block is body if any voxel is);
* air enclosed by the body in a slice (lungs, bowel gas, the trachea) is body too: holes are
  filled in every 2-D slice along each of the three axes, and the union taken, so an enclosed
  pocket counts as body if any slicing encloses it (the lungs are enclosed in axial slices even
  where the trachea leaves the field of view at the top).

A tile of the preprocessed grid is left out only if no block is body within the region of the
cropped grid that the tile is resampled from, widened by ``MARGIN`` cropped voxels (the reach of the
cubic kernel, and one more) plus two preprocessed voxels (:meth:`BodyMask.tile_has_body`). So every
preprocessed voxel within two voxels of the body is covered by exactly the tiles that cover it
without the mask, in the same order, and its logits are the same bit for bit; the revert to the
original grid interpolates linearly between the nearest preprocessed voxels, so every body voxel
of the original image keeps its label. Only air next to a left-out tile averages fewer tiles, and
air that no computed tile covers is background. (nnU-Net models resample with a B-spline, whose
prefilter reaches further, with weights that fall by about 3.7x per voxel: beyond the margin they
are below 1e-3 of a voxel's value.) Used for CT channels only (normalisation ``ct`` or ``window``),
where the values are HU.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from suprem_net.preprocessing.orientation import reorient

BODY_HU = -500.0
BLOCK = 4
MARGIN = 3  # cropped voxels around a tile: the reach of the cubic resampling kernel, and one more


def is_ct(normalization: Sequence[dict]) -> bool:
    """Whether the first channel holds HU (its normalisation is a CT scheme)."""
    return bool(normalization) and normalization[0].get("scheme") in ("ct", "window")


def _pooled(channel: np.ndarray, threshold: float, block: int) -> np.ndarray:
    """Blocks of ``block``^3 voxels with any voxel above ``threshold``; the volume is read plane
    group by plane group, so no full-size temporary is made."""
    shape = channel.shape
    nb = [math.ceil(s / block) for s in shape]
    out = np.zeros(nb, dtype=bool)
    for i in range(nb[0]):
        above = (channel[i * block:(i + 1) * block] > threshold).any(axis=0)
        padded = np.zeros((nb[1] * block, nb[2] * block), dtype=bool)
        padded[:shape[1], :shape[2]] = above
        out[i] = padded.reshape(nb[1], block, nb[2], block).any(axis=(1, 3))
    return out


def _filled_in_slices(mask: np.ndarray, axis: int) -> np.ndarray:
    """``mask`` with the air that does not reach the edge of its 2-D slice (across ``axis``) filled."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    index = [slice(None)] * 3
    index[axis] = 1
    structure[tuple(index)] = ndimage.generate_binary_structure(2, 1)
    labels, _ = ndimage.label(~mask, structure)
    edge = set()
    for a in range(3):
        if a != axis:
            edge.update(np.unique(np.take(labels, 0, axis=a)).tolist())
            edge.update(np.unique(np.take(labels, -1, axis=a)).tolist())
    edge.discard(0)
    return ~np.isin(labels, sorted(edge))


@dataclass
class BodyMask:
    """The body of a case in blocks (see the module docstring). Block ``j`` along an axis covers the
    cropped voxels [origin + j * block, origin + (j + 1) * block)."""

    blocks: np.ndarray          # bool, one entry per block of ``block``^3 voxels, in the oriented axis order
    crop_shape: tuple[int, ...]
    origin: tuple[int, ...]     # cropped voxel index where block 0 starts (<= 0), per axis
    block: int = BLOCK

    @classmethod
    def of(cls, channel: np.ndarray, transform: dict | None, bbox: Sequence[Sequence[int]],
           threshold: float = BODY_HU, block: int = BLOCK) -> "BodyMask":
        """The body of ``channel`` (HU, as read: pooled in its own memory order, which is fast), for the
        grid that orientation ``transform`` and the crop box ``bbox`` (oriented voxels) make of it."""
        pooled = _pooled(channel, threshold, block)
        origin = [0, 0, 0]
        if transform:
            pooled = np.ascontiguousarray(reorient(pooled, transform))
            for i, (axis, flipped) in enumerate(zip(transform["perm"], transform["flip"])):
                if flipped:  # the last block now comes first, aligned to the far end
                    origin[i] = channel.shape[axis] - block * pooled.shape[i]
        body = pooled.copy()
        for axis in range(3):
            body |= _filled_in_slices(pooled, axis)
        return cls(body, tuple(int(hi - lo) for lo, hi in bbox),
                   tuple(int(o - box[0]) for o, box in zip(origin, bbox)), block)

    @property
    def fraction(self) -> float:
        """The share of blocks that are body."""
        return float(self.blocks.mean()) if self.blocks.size else 1.0

    def tile_has_body(self, start: Sequence[int], size: Sequence[int], grid_shape: Sequence[int]) -> bool:
        """Whether a tile at ``start`` of ``size`` voxels on the preprocessed grid ``grid_shape``
        (the cropped grid resampled) may hold body, conservatively."""
        index = []
        for s, p, n, c, o, nb in zip(start, size, grid_shape, self.crop_shape, self.origin, self.blocks.shape):
            scale = c / n
            reach = MARGIN + math.ceil(2 * scale)
            lo = max(0, math.floor(max(s, 0) * scale) - reach)
            hi = min(c, math.ceil(min(s + p, n) * scale) + reach)
            if hi <= lo:
                return False
            index.append(slice(max(0, (lo - o) // self.block), min(nb, (hi - 1 - o) // self.block + 1)))
        return bool(self.blocks[tuple(index)].any())
