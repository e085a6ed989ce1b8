"""nnU-Net-style CNNs from dynamic-network-architectures: PlainConvUNet (``nnunet``) and
ResidualEncoderUNet (``resenc``), with the topology (stages, kernels, strides) from the plan.

Plan kwargs: ``n_stages``, ``features_per_stage``, ``kernel_sizes``, ``strides``,
``n_conv_per_stage`` (``n_blocks_per_stage`` for resenc) and ``n_conv_per_stage_decoder``.
Norm, non-linearity and bias follow nnU-Net: InstanceNorm3d(eps=1e-5, affine), LeakyReLU, bias.
"""
from __future__ import annotations

import torch.nn as nn
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

DIVISOR = None  # the topology is derived from the patch size
HEAD_PATTERN = r"decoder\.seg_layers\.\d+"  # one 1x1x1 output conv per deep-supervision level


def build(family: str, kwargs: dict, in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    common = dict(
        input_channels=in_channels,
        num_classes=num_classes,
        conv_op=nn.Conv3d,
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        dropout_op=None,
        dropout_op_kwargs=None,
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=deep_supervision,
    )
    if family == "resenc":
        return ResidualEncoderUNet(**common, **kwargs)
    return PlainConvUNet(**common, **kwargs)
