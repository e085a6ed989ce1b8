"""Make a training step cheaper without changing what is computed (what each lever buys on which
CPU is measured by ``benchmarks/train_step_levers.py``; the figures are in docs/benchmarks.md):

* **channels-last memory** (NDHWC): oneDNN runs the 3-D convolutions without reordering their inputs;
* **instance norms as group norms** with one channel per group: the same arithmetic and the same
  parameters (``weight``, ``bias``, so checkpoints keep their keys), but PyTorch's instance norm
  reshapes to (1, N*C, ...) and so copies channels-last tensors back and forth, group norm does not;
* **non-overlapping transposed convolutions as one matrix product** (kernel = stride, the U-Nets'
  upsampling): each input voxel times a (C_in, k*k*k*C_out) matrix, then the blocks moved into place,
  which inductor fuses with the bias and the skip concatenation; oneDNN's transposed convolutions run
  well below its convolutions' speed;
* **torch.compile** (inductor): fuses the norm, non-linearity and their backward passes around the
  convolutions, for the price of one compilation at the start (seconds from the cache);
* **freed memory kept for reuse** (glibc): by default glibc hands large freed blocks back to the
  kernel (``munmap``, or trimming the top of the heap), so the next step's activations are fresh
  pages that the kernel zero-fills one fault at a time; kept, a step has none of these faults.

Only compile is used on any device (unless switched off); the rest is CPU-specific. On CUDA,
cuDNN's autotuner is switched on instead (the patch shape never changes).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from suprem_net.networks import get_family
from suprem_net.networks.speed import (  # noqa: F401  (the levers live there, shared with prediction)
    UpsamplingAsMatmul, compiled, instance_norms_as_group_norms, is_compile_failure, keep_freed_memory,
    upsampling_as_matmuls)

log = logging.getLogger(__name__)


def prepare_for_training(model: nn.Module, family: str, device: torch.device,
                         deterministic: bool = False) -> torch.memory_format:
    """Adapt ``model`` (in place) and, on the CPU, this process's allocator for fast training on
    ``device``; returns the memory format that the model's inputs should have. On CUDA, cuDNN
    chooses its fastest convolution algorithms for the (fixed) patch shape, as nnU-Net does,
    unless the run must be deterministic."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
    if device.type != "cpu":
        return torch.contiguous_format
    kept = keep_freed_memory()
    if not get_family(family).channels_last:
        return torch.contiguous_format
    n = instance_norms_as_group_norms(model)
    up = upsampling_as_matmuls(model)
    model.to(memory_format=torch.channels_last_3d)
    log.debug("CPU training: channels-last memory, %d instance norms as group norms, %d upsamplings as matrix "
              "products, freed memory kept: %s", n, up, kept)
    return torch.channels_last_3d


