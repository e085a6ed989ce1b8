"""Make a training step cheaper without changing what is computed.

Measured on 2 x86 cores (fp32; the convolutions take 80-90 % of a step, see docs/benchmarks.md):

* **channels-last memory** (NDHWC): oneDNN runs the 3-D convolutions without reordering their
  inputs, about 25 % faster for the wide full-resolution layers;
* **instance norms as group norms** with one channel per group: the same arithmetic and the same
  parameters (``weight``, ``bias``, so checkpoints keep their keys), but PyTorch's instance norm
  reshapes to (1, N*C, ...) and so copies channels-last tensors back and forth, group norm does not;
* **torch.compile** (inductor): fuses the norm, non-linearity and their backward passes around the
  convolutions. It costs one compilation at the start (about 30 s cold, seconds from the cache).

Together about 0.7x the time per iteration of the plain model on the CPU. Only the first two are
CPU-specific; compile is used on any device unless switched off.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

CHANNELS_LAST_FAMILIES = ("nnunet", "resenc", "suprem_unet", "segresnet", "dodnet", "med3d")


def instance_norms_as_group_norms(model: nn.Module) -> int:
    """Replace every 3-D instance norm without running statistics by ``GroupNorm(C, C)`` (one channel
    per group: the same arithmetic, the same state-dict keys); returns how many were replaced.
    The parameters are moved over as they are, so an optimiser built before still holds them."""
    count = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.InstanceNorm3d) and not child.track_running_stats:
                gn = nn.GroupNorm(child.num_features, child.num_features, eps=child.eps, affine=child.affine)
                if child.affine:
                    gn.weight, gn.bias = child.weight, child.bias
                setattr(parent, name, gn)
                count += 1
    return count


def prepare_for_training(model: nn.Module, family: str, device: torch.device) -> torch.memory_format:
    """Adapt ``model`` in place for fast training on ``device``; returns the memory format that
    its inputs should have."""
    if device.type != "cpu" or family not in CHANNELS_LAST_FAMILIES:
        return torch.contiguous_format
    n = instance_norms_as_group_norms(model)
    model.to(memory_format=torch.channels_last_3d)
    log.debug("CPU training: channels-last memory, %d instance norms as group norms", n)
    return torch.channels_last_3d


def compiled(model: nn.Module) -> nn.Module:
    """``torch.compile`` for the fixed training shape (patch and batch never change); the model itself
    (with a warning) when torch.compile cannot even be set up here."""
    try:
        return torch.compile(model, dynamic=False)
    except Exception as e:  # e.g. inductor failing to import its templates under a non-UTF-8 locale
        log.warning("torch.compile is not available (%s: %s); training without it",
                    type(e).__name__, " ".join(str(e).split())[:200])
        return model


def is_compile_failure(exc: BaseException) -> bool:
    """Whether ``exc`` came from torch.compile's backend (e.g. no C++ compiler on this machine)."""
    from torch._dynamo.exc import BackendCompilerFailed, TorchDynamoException

    return isinstance(exc, (BackendCompilerFailed, TorchDynamoException))
