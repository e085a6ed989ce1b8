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

import ctypes
import logging
import sys

import torch
import torch.nn as nn

from suprem_net.networks import get_family

log = logging.getLogger(__name__)


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


class UpsamplingAsMatmul(nn.ConvTranspose3d):
    """A transposed convolution whose kernel equals its stride (no overlap, no padding), computed as a
    matrix product on channels-last data. Same parameters and keys as ``nn.ConvTranspose3d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, d, h, w = x.shape
        kd, kh, kw = self.kernel_size
        y = x.permute(0, 2, 3, 4, 1) @ self.weight.permute(0, 2, 3, 4, 1).reshape(c, -1)  # (n,d,h,w, kd*kh*kw*C_out)
        y = y.view(n, d, h, w, kd, kh, kw, -1).permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(n, d * kd, h * kh, w * kw, -1)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)  # under autocast y is bf16/fp16, as the convolution's output would be
        return y.permute(0, 4, 1, 2, 3)  # channels-last (N, C, D, H, W)


def upsampling_as_matmuls(model: nn.Module) -> int:
    """Turn every plain 3-D transposed convolution with kernel = stride into an
    :class:`UpsamplingAsMatmul` (the same module, parameters and keys; only its forward differs);
    returns how many."""
    count = 0
    for m in model.modules():
        if (type(m) is nn.ConvTranspose3d and m.kernel_size == m.stride and m.groups == 1
                and not any(m.padding) and not any(m.output_padding) and m.dilation == (1, 1, 1)):
            m.__class__ = UpsamplingAsMatmul
            count += 1
    return count


CPU_LEVERS = ("channels_last", "upsampling_as_matmul", "keep_freed_memory")


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
    n = instance_norms_as_group_norms(model)
    up = upsampling_as_matmuls(model) if levers.get("upsampling_as_matmul") else 0
    model.to(memory_format=torch.channels_last_3d)
    log.debug("CPU training: channels-last memory, %d instance norms as group norms, %d upsamplings as matrix "
              "products, freed memory kept: %s", n, up, kept)
    return torch.channels_last_3d


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
GLIBC_DEFAULT_THRESHOLD = 128 * 1024  # glibc's initial trim and mmap thresholds
_kept = False  # whether this process keeps freed memory (set_freed_memory_kept)


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (e.g. musl)
        return None


def keep_freed_memory() -> bool:
    """Ask glibc to serve large allocations from the heap and not to give freed memory back, so the
    activations of one step reuse the pages of the last one (PyTorch's CPU allocator is plain
    malloc). Affects this process and the workers it forks; the resident size stays at its peak
    instead of shrinking between steps. Returns whether it took effect (False off glibc)."""
    return set_freed_memory_kept(True)


def set_freed_memory_kept(on: bool) -> bool:
    """:func:`keep_freed_memory` (``on``), or glibc's initial thresholds back (128 KiB: large blocks
    mmapped and trimmed; glibc then no longer raises them by itself, which only matters for blocks
    under 32 MiB). Returns whether freed memory is now kept."""
    global _kept
    mallopt = _mallopt()
    if mallopt is None or (not on and not _kept):
        return False
    if not on:
        mallopt(_M_MMAP_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
        mallopt(_M_TRIM_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
        _kept = False
        return False
    # older glibc refuses thresholds above 32 MiB; tensors larger than the one accepted stay mmapped
    mmap_ok = any(mallopt(_M_MMAP_THRESHOLD, size) for size in (1 << 30, 32 << 20))
    _kept = mmap_ok and bool(mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
    return _kept


def freed_memory_is_kept() -> bool:
    """Whether :func:`set_freed_memory_kept` last kept freed memory in this process."""
    return _kept


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
