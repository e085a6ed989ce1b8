"""DoDNet backbone (``dodnet``): the 3D residual U-Net of Zhang et al. (CVPR 2021,
github jianpengz/DoDNet, ``a_DynConv/unet3D_DynConv882.py``), re-implemented key-compatibly from
its public definition, with a plain head instead of the task-conditioned dynamic head.

Architecture: pre-activation residual blocks (GroupNorm(16) -> ReLU -> conv, twice, plus a
GN/ReLU/1x1-conv projection when the shape changes); ``conv1`` 1->32, ``layer0`` (1 block, 32),
``layer1`` (2, 64, /2), ``layer2`` (2, 128, /4), ``layer3`` (2, 256, /8), ``layer4`` (2, 256, /16),
``fusionConv`` (GN, ReLU, 1x1); decoder: trilinear x2 upsampling, *addition* of the skip, one
residual block each (``x8_resb`` 256->128, ``x4_resb`` 128->64, ``x2_resb`` 64->32,
``x1_resb`` 32->32). All these convolutions are bias-free and, as trained (``--weight_std``
defaults to True), weight-standardised. 17,285,920 backbone parameters (the table's 17.29M).

DoDNet's own head (``precls_conv``, ``GAP``, ``controller``: per-task dynamic 8-8-2 kernels) is
not built; fine-tuning uses ``cls_conv`` = GroupNorm(16, 32) -> ReLU -> Conv3d(32, C, 1).
Every patch edge must be divisible by 16. No deep supervision (ignored).

Plan kwargs: ``weight_std`` (True).
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from suprem_net.errors import SupremError
from suprem_net.networks.family import Family, prefixed

logger = logging.getLogger(__name__)

DEFAULT_KWARGS: dict = {"weight_std": True}


class WSConv3d(nn.Conv3d):
    """Conv3d with weight standardisation (per output filter: zero mean, unit std)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = w - w.mean(dim=(1, 2, 3, 4), keepdim=True)
        std = torch.sqrt(w.reshape(w.shape[0], -1).var(dim=1) + 1e-12).reshape(-1, 1, 1, 1, 1)
        return F.conv3d(x, w / std, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _conv(cin: int, cout: int, k: int, stride: int, ws: bool) -> nn.Conv3d:
    cls = WSConv3d if ws else nn.Conv3d
    return cls(cin, cout, kernel_size=k, stride=stride, padding=k // 2, bias=False)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, ws: bool) -> None:
        super().__init__()
        self.gn1 = nn.GroupNorm(16, cin)
        self.conv1 = _conv(cin, cout, 3, stride, ws)
        self.relu = nn.ReLU(inplace=True)
        self.gn2 = nn.GroupNorm(16, cout)
        self.conv2 = _conv(cout, cout, 3, 1, ws)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.GroupNorm(16, cin), nn.ReLU(inplace=True), _conv(cin, cout, 1, stride, ws))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.gn1(x)))
        out = self.conv2(self.relu(self.gn2(out)))
        return out + (self.downsample(x) if self.downsample is not None else x)


def _layer(cin: int, cout: int, blocks: int, stride: int, ws: bool) -> nn.Sequential:
    return nn.Sequential(ResBlock(cin, cout, stride, ws), *[ResBlock(cout, cout, 1, ws) for _ in range(blocks - 1)])


class DoDNetUNet3D(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 2, weight_std: bool = True) -> None:
        super().__init__()
        ws = weight_std
        self.conv1 = _conv(in_channels, 32, 3, 1, ws)
        self.layer0 = _layer(32, 32, 1, 1, ws)
        self.layer1 = _layer(32, 64, 2, 2, ws)
        self.layer2 = _layer(64, 128, 2, 2, ws)
        self.layer3 = _layer(128, 256, 2, 2, ws)
        self.layer4 = _layer(256, 256, 2, 2, ws)
        self.fusionConv = nn.Sequential(nn.GroupNorm(16, 256), nn.ReLU(inplace=True), _conv(256, 256, 1, 1, ws))
        self.x8_resb = _layer(256, 128, 1, 1, ws)
        self.x4_resb = _layer(128, 64, 1, 1, ws)
        self.x2_resb = _layer(64, 32, 1, 1, ws)
        self.x1_resb = _layer(32, 32, 1, 1, ws)
        self.cls_conv = nn.Sequential(nn.GroupNorm(16, 32), nn.ReLU(inplace=True), nn.Conv3d(32, num_classes, 1))

    @staticmethod
    def _up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip0 = self.layer0(self.conv1(x))
        skip1 = self.layer1(skip0)
        skip2 = self.layer2(skip1)
        skip3 = self.layer3(skip2)
        x = self.fusionConv(self.layer4(skip3))
        x = self.x8_resb(self._up(x) + skip3)
        x = self.x4_resb(self._up(x) + skip2)
        x = self.x2_resb(self._up(x) + skip1)
        x = self.x1_resb(self._up(x) + skip0)
        return self.cls_conv(x)


def build(family: str, kwargs: dict, in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    """Build the DoDNet backbone with a plain head (see the module docstring)."""
    unknown = set(kwargs) - set(DEFAULT_KWARGS)
    if unknown:
        raise SupremError(f"dodnet: unknown network kwargs {sorted(unknown)}; allowed: {sorted(DEFAULT_KWARGS)}")
    opts = {**DEFAULT_KWARGS, **kwargs}
    if deep_supervision:
        logger.debug("dodnet has no deep supervision; the flag is ignored")
    return DoDNetUNet3D(in_channels, num_classes, weight_std=bool(opts["weight_std"]))


FAMILIES = {"dodnet": Family(
    "dodnet", functools.partial(build, "dodnet"), published_kwargs=DEFAULT_KWARGS, divisor=16, min_patch=32,
    head_key="cls_conv.2", input_keys=("conv1.weight",), encoder_prefixes=("conv1.", "layer"),
    signature=prefixed("x8_resb."), channels_last=True)}
