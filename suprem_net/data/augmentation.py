"""The training transform pipeline (batchgenerators v1), nnU-Net's default recipe.

Spatial (rotation, scaling, optional elastic; centre crop from the larger read region to the
plan's patch), then intensity (noise, blur, brightness, contrast, low resolution, gamma) and
mirroring. All randomness comes from numpy's global generator, which the loader seeds per
batch, so a batch is a function of (seed, epoch, iteration, rank).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from batchgenerators.transforms.abstract_transforms import Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

ANISOTROPY_RATIO = 3.0


@dataclass
class AugmentationConfig:
    rotation_deg: tuple[float, float, float] = (30.0, 30.0, 30.0)  # about z (in-plane), y, x
    scale: tuple[float, float] = (0.7, 1.4)
    elastic: bool = False
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    p_rotation: float = 0.2
    p_scale: float = 0.2
    p_elastic: float = 0.2

    @classmethod
    def for_patch(cls, patch, elastic: bool = False) -> "AugmentationConfig":
        """Full 3D rotation, or in-plane only when the patch is much thinner along z."""
        cfg = cls(elastic=elastic)
        if max(patch[1:]) / patch[0] > ANISOTROPY_RATIO:
            cfg.rotation_deg = (30.0, 0.0, 0.0)
        return cfg

    def read_margin_scale(self) -> float:
        """Largest zoom-out factor the spatial transform uses (sampling coordinates scale by it)."""
        return self.scale[1]


def training_transforms(patch, cfg: AugmentationConfig) -> Compose:
    # batchgenerators' angle_x rotates about the first spatial axis (our z)
    rz, ry, rx = (math.radians(a) for a in cfg.rotation_deg)
    ignore_axes = (0,) if max(patch[1:]) / patch[0] > ANISOTROPY_RATIO else None
    transforms = [
        SpatialTransform(
            list(patch), patch_center_dist_from_border=None, do_elastic_deform=cfg.elastic,
            alpha=(0.0, 200.0), sigma=(9.0, 13.0), do_rotation=any(cfg.rotation_deg),
            angle_x=(-rz, rz), angle_y=(-ry, ry), angle_z=(-rx, rx), do_scale=True, scale=cfg.scale,
            border_mode_data="constant", border_cval_data=0, order_data=1, border_mode_seg="constant",
            border_cval_seg=0, order_seg=0, random_crop=False, p_el_per_sample=cfg.p_elastic,
            p_scale_per_sample=cfg.p_scale, p_rot_per_sample=cfg.p_rotation,
            independent_scale_for_each_axis=False),
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
