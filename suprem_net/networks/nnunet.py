"""nnU-Net-style CNNs from dynamic-network-architectures: PlainConvUNet (``nnunet``) and
ResidualEncoderUNet (``resenc``), with the topology (stages, kernels, strides) from the plan.

Plan kwargs: ``n_stages``, ``features_per_stage``, ``kernel_sizes``, ``strides``,
``n_conv_per_stage`` (``n_blocks_per_stage`` for resenc) and ``n_conv_per_stage_decoder``.
Norm, non-linearity and bias follow nnU-Net: InstanceNorm3d(eps=1e-5, affine), LeakyReLU, bias.
"""
from __future__ import annotations

import functools

import torch.nn as nn
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from suprem_net.networks.family import Family

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


def _plain_kwargs(strides: list, kernels: list, features: list) -> dict:
    n = len(strides)
    return {"n_stages": n, "features_per_stage": features, "kernel_sizes": kernels, "strides": strides,
            "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1)}


def _resenc_kwargs(strides: list, kernels: list, features: list) -> dict:
    n = len(strides)
    return {"n_stages": n, "features_per_stage": features, "kernel_sizes": kernels, "strides": strides,
            "n_blocks_per_stage": [1, 3, 4, 6, 6, 6, 6][:n], "n_conv_per_stage_decoder": [1] * (n - 1)}


_COMMON = dict(head_pattern=HEAD_PATTERN, encoder_prefixes=("encoder.",), deep_supervision=True, channels_last=True)
FAMILIES = {
    "nnunet": Family("nnunet", functools.partial(build, "nnunet"), topology_kwargs=_plain_kwargs, **_COMMON),
    "resenc": Family("resenc", functools.partial(build, "resenc"), topology_kwargs=_resenc_kwargs, **_COMMON),
}
