"""What the rest of suprem_net knows about a network family, declared next to the model (as timm's
models carry their pretrained configs): one :class:`Family` record per family, in the family's module."""
from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch.nn as nn


def _always(kwargs: dict) -> bool:
    return True


def prefixed(prefix: str) -> Callable[[Collection[str]], bool]:
    """A :attr:`Family.signature`: some state-dict key starts with ``prefix``."""
    return lambda keys: any(k.startswith(prefix) for k in keys)


@dataclass(frozen=True)
class Family:
    name: str
    # build(kwargs, in_channels, num_classes, deep_supervision) -> the model; kwargs are complete
    # (published_kwargs overridden by the plan's)
    build: Callable[[dict, int, int, bool], nn.Module]
    published_kwargs: dict = field(default_factory=dict)  # the published architecture: what kwargs {} builds
    # every patch edge must be divisible by this (one number, or one per axis in the family's axis
    # order); None: the topology (stages, kernels, strides) is derived from the patch (nnU-Net's rule)
    divisor: int | tuple[int, int, int] | None = None
    min_patch: int | tuple[int, int, int] | None = None   # smallest patch edge the planner shrinks to
    # nnU-Net-style families: (strides, kernels, features per stage) -> plan kwargs
    topology_kwargs: Callable[[list, list, list], dict] | None = None
    head_key: str | None = None              # the plain 1x1 output head (state-dict prefix)
    head_pattern: str | None = None          # regex of every output head's prefix (deep-supervision heads too)
    input_keys: tuple[str, ...] = ()         # state-dict entries whose shape depends on in_channels
    encoder_prefixes: tuple[str, ...] = ()   # parameters of the (pre-trained) encoder
    # recognises the (adapted) state-dict keys of this family's checkpoints
    signature: Callable[[Collection[str]], bool] | None = None
    axes: str = "xyz"                        # the axis order its published weights were trained in
    deep_supervision: bool = False           # planned with deep supervision
    patch_kwarg: str | None = None           # a kwarg that must equal the patch (a network built for one size)
    channels_last: bool = False              # trains faster in channels-last memory on the CPU
    grows_batch: bool = True                 # the GPU planner may raise the batch above 2
    # False: normalises with the statistics of the batch, so sliding-window tiles go one at a time
    batch_independent: Callable[[dict], bool] = _always
    training_defaults: dict | None = None    # the family's own recipe (optimiser, lr, schedule)

    @property
    def heads(self) -> str | None:
        """Regex of every output head's key prefix."""
        import re

        return self.head_pattern or (re.escape(self.head_key) if self.head_key else None)

    def kwargs(self, plan_kwargs: dict | None = None) -> dict:
        """The published kwargs overridden by a plan's."""
        return {**self.published_kwargs, **(plan_kwargs or {})}
