"""Swin UNETR (``swinunetr``): MONAI's ``SwinUNETR`` as used by SuPreM, Tang et al., the MONAI
50k self-supervised model and the CLIP-Driven Universal Model.

Published architecture: ``feature_size=48``, depths (2,2,2,2), heads (3,6,12,24), window 7,
patch 2, instance norm, no dropout: 62,186,610 parameters without the head, 62,187,835 with a
25-class head; 159 state-dict entries. Every patch edge must be divisible by 32. No deep
supervision (the flag is ignored).

Patch merging. The weights above were trained with MONAI <= 1.4, whose 3D ``PatchMerging``
concatenates the eight 2x2x2 sub-grids in a quirky order with two duplicates (offsets
(d,h,w) = 000, 100, 010, 001, 101, 010, 001, 111). MONAI 1.5 (PR #8285) changed it to
000, 100, 010, 001, 110, 101, 011, 111, which changes the outputs of the pretrained weights.
To be independent of the installed MONAI version this module always swaps in its own
:class:`SwinPatchMerging` (same ``norm`` / ``reduction`` keys) with the order chosen by the
plan kwarg ``legacy_patch_merging``: ``True`` (default) = the pre-1.5 order the pretrained
weights expect, ``False`` = the MONAI >= 1.5 order.

Plan kwargs (``{}`` gives the published network): ``feature_size`` (48),
``legacy_patch_merging`` (True), ``depths``, ``num_heads``, ``drop_rate``, ``attn_drop_rate``,
``dropout_path_rate`` (0.0), ``use_checkpoint`` (False, gradient checkpointing), ``use_v2``
(False; v2 adds residual blocks that no checkpoint has).
"""
from __future__ import annotations

import functools
import inspect
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR

from suprem_net.errors import SupremError
from suprem_net.networks.family import Family, prefixed

logger = logging.getLogger(__name__)

DEFAULT_KWARGS: dict = {
    "feature_size": 48,
    "legacy_patch_merging": True,
    "depths": [2, 2, 2, 2],
    "num_heads": [3, 6, 12, 24],
    "drop_rate": 0.0,
    "attn_drop_rate": 0.0,
    "dropout_path_rate": 0.0,
    "use_checkpoint": False,
    "use_v2": False,
}

# sub-grid offsets (d, h, w) in concatenation order
LEGACY_ORDER = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))
MONAI15_ORDER = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))


class SwinPatchMerging(nn.Module):
    """3D patch merging with an explicit sub-grid order; keys ``norm.*`` and ``reduction.weight``
    as in MONAI. Input ``[B, D, H, W, C]`` channels-last, output ``[B, D/2, H/2, W/2, 2C]``."""

    def __init__(self, norm: nn.Module, reduction: nn.Linear, legacy: bool = True) -> None:
        super().__init__()
        self.norm = norm
        self.reduction = reduction
        self.legacy = legacy

    @property
    def order(self) -> tuple[tuple[int, int, int], ...]:
        return LEGACY_ORDER if self.legacy else MONAI15_ORDER

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"expected a 5D channels-last input, got shape {tuple(x.shape)}")
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in self.order], dim=-1)
        return self.reduction(self.norm(x))

    def extra_repr(self) -> str:
        return f"legacy={self.legacy}"


def set_patch_merging(model: nn.Module, legacy: bool) -> int:
    """Replace every ``downsample`` patch-merging module of ``model`` by :class:`SwinPatchMerging`
    (keeping its parameters). Returns how many were replaced."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if not name.endswith("downsample") or not hasattr(module, "reduction") or not hasattr(module, "norm"):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, SwinPatchMerging(module.norm, module.reduction, legacy))
        replaced += 1
    return replaced


def build(family: str, kwargs: dict, in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    """Build MONAI's SwinUNETR with the SuPreM settings (see the module docstring)."""
    unknown = set(kwargs) - set(DEFAULT_KWARGS)
    if unknown:
        raise SupremError(f"swinunetr: unknown network kwargs {sorted(unknown)}; allowed: {sorted(DEFAULT_KWARGS)}")
    opts = {**DEFAULT_KWARGS, **kwargs}
    legacy = bool(opts.pop("legacy_patch_merging"))
    if int(opts["feature_size"]) % 12:
        raise SupremError(f"swinunetr: feature_size must be divisible by 12, got {opts['feature_size']}")
    if deep_supervision:
        logger.debug("swinunetr has no deep supervision; the flag is ignored")
    args = dict(in_channels=in_channels, out_channels=num_classes, feature_size=int(opts["feature_size"]),
                depths=tuple(opts["depths"]), num_heads=tuple(opts["num_heads"]),
                drop_rate=float(opts["drop_rate"]), attn_drop_rate=float(opts["attn_drop_rate"]),
                dropout_path_rate=float(opts["dropout_path_rate"]), use_checkpoint=bool(opts["use_checkpoint"]),
                use_v2=bool(opts["use_v2"]), downsample="merging")
    if "img_size" in inspect.signature(SwinUNETR.__init__).parameters:
        # MONAI < 1.5 requires it; it is only checked for divisibility by 32
        args["img_size"] = (96, 96, 96)
    model = SwinUNETR(**args)
    n = set_patch_merging(model, legacy)
    if n != 4:
        raise RuntimeError(f"expected 4 patch-merging modules in SwinUNETR, found {n}")
    return model


FAMILIES = {"swinunetr": Family(
    "swinunetr", functools.partial(build, "swinunetr"), published_kwargs=DEFAULT_KWARGS, divisor=32, min_patch=64,
    head_key="out.conv.conv", input_keys=("swinViT.patch_embed.proj.weight", "encoder1.layer.conv1.conv.weight",
              "encoder1.layer.conv3.conv.weight"),
    encoder_prefixes=("swinViT.", "encoder"), signature=prefixed("swinViT."),
    training_defaults={"optimizer": "adamw", "lr": 1e-4, "weight_decay": 1e-5, "schedule": "warmup_cosine"})}
