"""Which CPU levers (:mod:`suprem_net.networks.speed`: channels-last memory with group norms, upsampling
as matrix products, freed memory kept; torch.compile) a training run uses, and applying them. The plan
records the levers measured on its machine (:mod:`suprem_net.training.calibration`); a lever that loses
there is off. Only compile is used on any device (unless switched off); on CUDA, cuDNN's autotuner is
switched on instead (the patch shape never changes). Figures: docs/benchmarks.md.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from suprem_net.networks import get_family
from suprem_net.networks.speed import set_freed_memory_kept, to_channels_last

log = logging.getLogger(__name__)


def default_levers(family: str, device: torch.device) -> dict:
    """Every lever that applies to ``family`` on ``device`` switched on (the levers a plan records,
    measured on its machine, switch off those that lose there; ``threads``: None keeps PyTorch's)."""
    if device.type != "cpu":
        return {}
    cl = get_family(family).channels_last
    return {"channels_last": cl, "upsampling_as_matmul": cl, "keep_freed_memory": True, "threads": None}


def prepare_for_training(model: nn.Module, family: str, device: torch.device,
                         deterministic: bool = False, levers: dict | None = None) -> torch.memory_format:
    """Adapt ``model`` (in place) and, on the CPU, this process's allocator and threads for fast
    training on ``device`` with ``levers`` (default: :func:`default_levers`); returns the memory
    format that the model's inputs should have. On CUDA, cuDNN chooses its fastest convolution
    algorithms for the (fixed) patch shape, as nnU-Net does, unless the run must be deterministic."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
    if device.type != "cpu":
        return torch.contiguous_format
    on = {**default_levers(family, device), **(levers or {})}
    kept = set_freed_memory_kept(bool(on.get("keep_freed_memory")))
    if on.get("threads"):
        torch.set_num_threads(int(on["threads"]))
    return apply_model_levers(model, family, on, kept)


def apply_model_levers(model: nn.Module, family: str, levers: dict, kept: bool | None = None) -> torch.memory_format:
    """The levers that change the model: channels-last memory with group norms, upsampling as matrix
    products (only with channels-last, for families that train faster in it)."""
    if not (get_family(family).channels_last and levers.get("channels_last")):
        return torch.contiguous_format
    n, up = to_channels_last(model, bool(levers.get("upsampling_as_matmul")))
    log.debug("CPU training: channels-last memory, %d instance norms as group norms, %d upsamplings as matrix "
              "products, freed memory kept: %s", n, up, kept)
    return torch.channels_last_3d
