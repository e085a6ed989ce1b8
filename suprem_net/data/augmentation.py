"""The training transform pipeline (batchgenerators v1), nnU-Net's default recipe.

Spatial (rotation, scaling, optional elastic; :class:`SpatialAugmentation`, applied by the loader
while it reads each sample), then intensity (noise, blur, brightness, contrast, low resolution,
gamma) and mirroring. All randomness comes from numpy's global generator, which the loader seeds
per batch, so a batch is a function of (seed, epoch, iteration, rank).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from batchgenerators.augmentations.utils import (
    create_zero_centered_coordinate_mesh,
    elastic_deform_coordinates,
    interpolate_img,
    rotate_coords_3d,
    scale_coords,
)
from batchgenerators.transforms.abstract_transforms import Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform

ANISOTROPY_RATIO = 3.0
ELASTIC_ALPHA, ELASTIC_SIGMA = (0.0, 200.0), (9.0, 13.0)


def thin_axis(patch) -> int | None:
    """The axis along which a patch is much thinner than along the others (more than
    ``ANISOTROPY_RATIO``): the low-resolution axis of anisotropic data, or ``None``."""
    p = np.asarray(patch, dtype=float)
    axis = int(np.argmin(p))
    return axis if np.delete(p, axis).max() / p[axis] > ANISOTROPY_RATIO else None


@dataclass
class AugmentationConfig:
    rotation_deg: tuple[float, float, float] = (30.0, 30.0, 30.0)  # about array axes 0, 1, 2
    scale: tuple[float, float] = (0.7, 1.4)
    elastic: bool = False
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    p_rotation: float = 0.2
    p_scale: float = 0.2
    p_elastic: float = 0.2

    @classmethod
    def for_patch(cls, patch, elastic: bool = False) -> "AugmentationConfig":
        """Full 3D rotation, or in-plane only (about the thin axis) when the patch is much thinner along
        one axis (:func:`thin_axis`; whichever array axis that is in the plan's axis order)."""
        cfg = cls(elastic=elastic)
        axis = thin_axis(patch)
        if axis is not None:
            cfg.rotation_deg = tuple(30.0 if a == axis else 0.0 for a in range(3))
        return cfg


class SpatialAugmentation:
    """batchgenerators' ``SpatialTransform`` for one sample at a time, reading only what it needs.

    The draws (from numpy's global generator, in the library's order), the coordinate functions
    and the interpolation (linear for the image, nearest for the labels, zeros outside) are the
    library's. What differs is the input: the library's transform takes every sample cut to the
    largest region any draw could map into the patch (with 30 degree rotations and 1.4x zoom-out,
    many times the patch), so the workers read and decompressed that much for every sample. Here the
    region is the bounding box of the drawn sampling coordinates, and a sample drawn without
    rotation, scaling or deformation (most of them, with the default probabilities) is a plain read
    of the patch.
    """

    def __init__(self, patch, cfg: AugmentationConfig):
        self.patch, self.cfg = [int(p) for p in patch], cfg
        self._mesh: np.ndarray | None = None

    def _identity(self) -> np.ndarray:
        """The patch's own coordinates, made once (elastic deformation and rotation return new arrays)."""
        if self._mesh is None:
            self._mesh = create_zero_centered_coordinate_mesh(self.patch)
        return self._mesh

    def draw_coordinates(self) -> np.ndarray | None:
        """(3, *patch) sampling coordinates around the patch centre, or ``None`` for the identity."""
        cfg = self.cfg
        coords = None
        if cfg.elastic and np.random.uniform() < cfg.p_elastic:
            alpha, sigma = np.random.uniform(*ELASTIC_ALPHA), np.random.uniform(*ELASTIC_SIGMA)
            coords = elastic_deform_coordinates(self._identity(), alpha, sigma)
        if any(cfg.rotation_deg) and np.random.uniform() < cfg.p_rotation:
            angles = []
            for deg in cfg.rotation_deg:  # about array axes 0 (the library's angle_x), 1, 2
                np.random.uniform()  # the library's per-axis draw (p_rot_per_axis = 1: always rotates)
                angles.append(np.random.uniform(-math.radians(deg), math.radians(deg)))
            coords = rotate_coords_3d(self._identity() if coords is None else coords, *angles)
        if np.random.uniform() < cfg.p_scale:
            low, high = cfg.scale
            zoom_in = np.random.random() < 0.5 and low < 1
            factor = np.random.uniform(low, 1) if zoom_in else np.random.uniform(max(low, 1), high)
            coords = scale_coords(self._identity().copy() if coords is None else coords, factor)  # in place
        return coords

    def __call__(self, read, lo) -> tuple[np.ndarray, np.ndarray]:
        """The augmented patch whose unaugmented position starts at ``lo``; ``read(lo, size)`` returns
        the image (C, ...) and labels (1, ...) of a region, zeros outside the volume."""
        coords = self.draw_coordinates()
        if coords is None:
            return read(lo, self.patch)
        coords += (np.asarray(lo, float) + (np.asarray(self.patch) - 1) / 2)[:, None, None, None]
        flat = coords.reshape(3, -1)
        region_lo = np.floor(flat.min(1)).astype(int)
        image, seg = read(region_lo, np.floor(flat.max(1)).astype(int) + 2 - region_lo)
        coords -= region_lo[:, None, None, None]
        image = np.stack([interpolate_img(c, coords, 1, "constant", 0.0) for c in image])
        return image, interpolate_img(seg[0], coords, 0, "constant", 0, is_seg=True)[None]


def training_transforms(patch, cfg: AugmentationConfig) -> Compose:
    """Everything after the spatial step: intensity transforms and mirroring."""
    axis = thin_axis(patch)
    ignore_axes = (axis,) if axis is not None else None
    transforms = [
        GaussianNoiseTransform(p_per_sample=0.1),
        GaussianBlurTransform((0.5, 1.0), different_sigma_per_channel=True, p_per_sample=0.2, p_per_channel=0.5),
        BrightnessMultiplicativeTransform(multiplier_range=(0.75, 1.25), p_per_sample=0.15),
        ContrastAugmentationTransform(p_per_sample=0.15),
        SimulateLowResolutionTransform(zoom_range=(0.5, 1), per_channel=True, p_per_channel=0.5, order_downsample=0,
                                       order_upsample=1, p_per_sample=0.25, ignore_axes=ignore_axes),
        GammaTransform((0.7, 1.5), True, True, retain_stats=True, p_per_sample=0.1),
        GammaTransform((0.7, 1.5), False, True, retain_stats=True, p_per_sample=0.3),
    ]
    if cfg.mirror_axes:
        transforms.append(MirrorTransform(cfg.mirror_axes))
    return Compose(transforms)
