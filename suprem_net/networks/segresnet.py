"""SegResNet (``segresnet``): MONAI's ``SegResNet`` exactly as SuPreM pre-trained it.

Published architecture: ``blocks_down=[1,2,2,4]``, ``blocks_up=[1,1,1]``, ``init_filters=16``,
``dropout_prob=0.0``, GroupNorm(8), ReLU, non-trainable trilinear upsampling: 4,701,305
parameters with 25 classes (the SuPreM README's "470.13M" is a typo, fixed upstream to 4.70M);
83 state-dict entries, head ``conv_final.2.conv``. Keys, shapes and outputs are the same in
MONAI 0.9 and 1.6. Every patch edge must be divisible by 8. No deep supervision (ignored).

Plan kwargs (``{}`` gives the published network): ``init_filters`` (16), ``blocks_down``,
``blocks_up``, ``dropout_prob`` (0.0). ``init_filters=32`` is the 18.80M "larger model"
mentioned by SuPreM, for which no weights were released.
"""
from __future__ import annotations

import functools
import logging

import torch.nn as nn
from monai.networks.nets import SegResNet

from suprem_net.errors import SupremError
from suprem_net.networks.family import Family, prefixed

logger = logging.getLogger(__name__)

DEFAULT_KWARGS: dict = {"init_filters": 16, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "dropout_prob": 0.0}


def build(family: str, kwargs: dict, in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    """Build MONAI's SegResNet with the SuPreM settings (see the module docstring)."""
    unknown = set(kwargs) - set(DEFAULT_KWARGS)
    if unknown:
        raise SupremError(f"segresnet: unknown network kwargs {sorted(unknown)}; allowed: {sorted(DEFAULT_KWARGS)}")
    opts = {**DEFAULT_KWARGS, **kwargs}
    blocks_down = tuple(int(b) for b in opts["blocks_down"])
    if len(opts["blocks_up"]) != len(blocks_down) - 1:
        raise SupremError("segresnet: blocks_up must have one entry fewer than blocks_down")
    if deep_supervision:
        logger.debug("segresnet has no deep supervision; the flag is ignored")
    dropout = opts["dropout_prob"]
    return SegResNet(spatial_dims=3, init_filters=int(opts["init_filters"]), in_channels=in_channels,
                     out_channels=num_classes, dropout_prob=None if dropout is None else float(dropout),
                     blocks_down=blocks_down, blocks_up=tuple(int(b) for b in opts["blocks_up"]))


FAMILIES = {"segresnet": Family(
    "segresnet", functools.partial(build, "segresnet"), published_kwargs=DEFAULT_KWARGS, divisor=8, min_patch=32,
    head_key="conv_final.2.conv", input_keys=("convInit.conv.weight",), encoder_prefixes=("convInit", "down_layers"),
    signature=prefixed("convInit."), channels_last=True)}
