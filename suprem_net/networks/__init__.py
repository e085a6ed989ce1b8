"""Network families, each built from the plan's ``network`` entry.

A plan stores ``{"family": NAME, "kwargs": {...}, "deep_supervision": bool}``;
``build_network(network, in_channels, num_classes)`` is the one way to make a model. Each family
module declares a ``FAMILIES`` dict of :class:`~suprem_net.networks.family.Family` records: how to
build it and every trait the planner, trainer, predictor and weight loader need (divisor, heads,
encoder, axis order, published kwargs, ...). :func:`get_family` returns the record of a name.
"""
from __future__ import annotations

import importlib
from collections.abc import Collection

import torch.nn as nn

from suprem_net.errors import SupremError
from suprem_net.networks.family import Family

# family name -> module under suprem_net.networks (imported when the family is first used)
_MODULES: dict[str, str] = {
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
FAMILY_NAMES = tuple(_MODULES)


def get_family(name: str) -> Family:
    """The :class:`Family` record of ``name``; an unknown name is a user error."""
    if name not in _MODULES:
        raise SupremError(f"unknown network family {name!r}; choose one of {', '.join(_MODULES)}")
    return importlib.import_module(f"suprem_net.networks.{_MODULES[name]}").FAMILIES[name]


def build_network(network: dict, in_channels: int, num_classes: int) -> nn.Module:
    """Build the model a plan describes. ``network`` is the plan's ``network`` entry. The model
    records its family name (``model.suprem_family``)."""
    family = get_family(network["family"])
    model = family.build(dict(network.get("kwargs", {})), in_channels, num_classes,
                         bool(network.get("deep_supervision", False)))
    model.suprem_family = family.name
    return model


def family_of_keys(keys: Collection[str]) -> str | None:
    """The family whose checkpoints have these (adapted) state-dict keys, or ``None``."""
    keys = set(keys)
    for name in _MODULES:
        signature = get_family(name).signature
        if signature is not None and signature(keys):
            return name
    return None
