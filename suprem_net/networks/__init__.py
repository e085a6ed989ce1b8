"""Network families, each built from the plan's ``network`` entry.

A plan stores ``{"family": NAME, "kwargs": {...}, "deep_supervision": bool}``;
``build_network(network, in_channels, num_classes)`` is the one way to make a model.
Each family module exposes ``build(family, kwargs, in_channels, num_classes, deep_supervision)``
and a ``DIVISOR`` (what every patch edge must be divisible by: one number, or one per axis (z, y, x)
as for UniMiSS; ``None`` when the topology is derived from the patch, as for the nnU-Net-style CNNs).
"""
from __future__ import annotations

import importlib

import torch.nn as nn

from suprem_net.errors import SupremError

# family name -> module under suprem_net.networks
FAMILIES: dict[str, str] = {
    "nnunet": "nnunet",
    "resenc": "nnunet",
    "suprem_unet": "suprem_unet",
    "swinunetr": "swinunetr",
    "segresnet": "segresnet",
    "dodnet": "dodnet",
    "med3d": "med3d",
    "unimiss_tiny": "unimiss",
    "unimiss_small": "unimiss",
}


def family_module(family: str):
    if family not in FAMILIES:
        raise SupremError(f"unknown network family {family!r}; choose one of {', '.join(FAMILIES)}")
    try:
        return importlib.import_module(f"suprem_net.networks.{FAMILIES[family]}")
    except ModuleNotFoundError as e:
        if e.name == f"suprem_net.networks.{FAMILIES[family]}":
            raise SupremError(f"network family {family!r} is not available in this version") from None
        raise


def build_network(network: dict, in_channels: int, num_classes: int) -> nn.Module:
    """Build the model a plan describes. ``network`` is the plan's ``network`` entry."""
    mod = family_module(network["family"])
    return mod.build(network["family"], dict(network.get("kwargs", {})), in_channels, num_classes,
                     bool(network.get("deep_supervision", False)))
