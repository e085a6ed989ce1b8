"""Med3D (``med3d``): Tencent MedicalNet's 3D ResNet-101 with its segmentation head
(Chen et al. 2019, github Tencent/MedicalNet ``models/resnet.py``), re-implemented
key-compatibly from the public definition.

Encoder: ``conv1`` (7x7x7, stride 2, 1->64, no bias), ``bn1``, ReLU, max-pool (3, stride 2);
``layer1..layer4`` of Bottleneck blocks [3, 4, 23, 3] (1x1, 3x3x3, 1x1 convs without bias, each
followed by BatchNorm3d; ``downsample`` = 1x1 conv + BN, shortcut type B), ``layer2`` stride 2,
``layer3`` dilation 2 and ``layer4`` dilation 4 (stride 1). Head ``conv_seg``:
ConvTranspose3d(2048, 32, 2, stride 2) -> BN -> ReLU -> Conv3d(32, 32, 3, no bias) -> BN -> ReLU
-> Conv3d(32, C, 1, no bias). 85,753,376 parameters with 2 classes (the table's 85.75M),
85,201,216 in the encoder.

MedicalNet predicts at 1/4 of the input resolution; this module adds a parameter-free trilinear
x4 upsampling so the output matches the input like the other families. Every patch edge must be
divisible by 8. No deep supervision (ignored). Plan kwargs: ``layers`` ([3, 4, 23, 3]).
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

DEFAULT_KWARGS: dict = {"layers": [3, 4, 23, 3]}


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, kernel_size=3, stride=stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


class Med3DResNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 2, layers: tuple[int, ...] = (3, 4, 23, 3)) -> None:
        super().__init__()
        self._inplanes = 64
        self.conv1 = nn.Conv3d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], dilation=2)
        self.layer4 = self._make_layer(512, layers[3], dilation=4)
        self.conv_seg = nn.Sequential(
            nn.ConvTranspose3d(512 * Bottleneck.expansion, 32, kernel_size=2, stride=2),
            nn.BatchNorm3d(32), nn.ReLU(inplace=True),
            nn.Conv3d(32, 32, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm3d(32), nn.ReLU(inplace=True),
            nn.Conv3d(32, num_classes, kernel_size=1, bias=False),
        )

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv3d(self._inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm3d(planes * Bottleneck.expansion))
        layers = [Bottleneck(self._inplanes, planes, stride, dilation, downsample)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.conv_seg(x)
        return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


def build(family: str, kwargs: dict, in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    """Build MedicalNet's ResNet-101 segmentation network (see the module docstring)."""
    unknown = set(kwargs) - set(DEFAULT_KWARGS)
    if unknown:
        raise SupremError(f"med3d: unknown network kwargs {sorted(unknown)}; allowed: {sorted(DEFAULT_KWARGS)}")
    layers = tuple(int(n) for n in {**DEFAULT_KWARGS, **kwargs}["layers"])
    if len(layers) != 4 or min(layers) < 1:
        raise SupremError(f"med3d: layers must be 4 positive block counts, got {list(layers)}")
    if deep_supervision:
        logger.debug("med3d has no deep supervision; the flag is ignored")
    return Med3DResNet(in_channels, num_classes, layers)


FAMILIES = {"med3d": Family(
    "med3d", functools.partial(build, "med3d"), published_kwargs=DEFAULT_KWARGS, divisor=8, min_patch=32,
    head_key="conv_seg.6", input_keys=("conv1.weight",), encoder_prefixes=("conv1.", "bn1.", "layer"),
    signature=prefixed("layer4.0.conv3."), channels_last=True)}
