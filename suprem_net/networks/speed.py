"""CPU speed levers shared by training and prediction: each changes how a network is computed, never
what (same parameters, same state-dict keys, the same arithmetic up to rounding). Which lever wins on
which CPU is measured (``benchmarks/train_step_levers.py``, ``benchmarks/predict_limits.py``; figures in
docs/benchmarks.md); :mod:`suprem_net.training.acceleration` and :mod:`suprem_net.inference.predictor`
decide which to use.

* **instance norms as group norms** with one channel per group: PyTorch's instance norm reshapes to
  (1, N*C, ...) and so copies channels-last tensors back and forth, group norm does not;
* **non-overlapping transposed convolutions as one matrix product** (kernel = stride, the U-Nets'
  upsampling): each input voxel times a (C_in, k*k*k*C_out) matrix, then the blocks moved into place;
  oneDNN's transposed convolutions run well below its convolutions' speed;
* **freed memory kept for reuse** (glibc): otherwise large freed blocks go back to the kernel and
  the next step's activations are fresh pages that the kernel zero-fills one fault at a time
  (prediction keeps only blocks up to :data:`PREDICTION_HEAP_LIMIT`, so that its resident size follows
  the large tensors alive rather than their high-water mark, and between forwards lets at most
  :data:`PREDICTION_FREE_HEAP` of freed heap stay resident);
* **torch.compile** (inductor): fuses the norms and non-linearities around the convolutions.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import sys

import torch
import torch.nn as nn

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


def to_channels_last(model: nn.Module, upsampling_as_matmul: bool = True) -> tuple[int, int]:
    """Channels-last memory for ``model`` (in place) with its instance norms as group norms and, unless
    ``upsampling_as_matmul`` is off, its upsampling as matrix products; returns how many norms and
    upsamplings were changed."""
    norms = instance_norms_as_group_norms(model)
    ups = upsampling_as_matmuls(model) if upsampling_as_matmul else 0
    model.to(memory_format=torch.channels_last_3d)
    return norms, ups


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
GLIBC_DEFAULT_THRESHOLD = 128 * 1024  # glibc's initial trim and mmap thresholds
# prediction: blocks up to this size are kept for reuse, larger ones returned when freed (32 MiB keeps
# the small nnU-Net model's tiles as fast as keeping everything; docs/benchmarks.md)
PREDICTION_HEAP_LIMIT = 32 << 20
# ... and between forwards, a heap with more free bytes than this gives its free pages back: above what
# the small nnU-Net model reuses from one forward to the next, below the fragments that a 96^3 U-Net's
# forwards pile up (docs/benchmarks.md, "Prediction at the machine's limit")
PREDICTION_FREE_HEAP = 256 << 20
_kept = False  # whether this process keeps freed memory (set_freed_memory_kept)


@functools.cache  # looked up once: the predictor asks between every two forwards
def _glibc(function: str):
    """``function`` of glibc, or None off Linux or with another C library (e.g. musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), function)
    except (OSError, AttributeError):
        return None


def keep_freed_memory(largest: int = 1 << 30) -> bool:
    """Ask glibc to serve allocations up to ``largest`` bytes from the heap and not to give freed memory
    back, so the activations of one step reuse the pages of the last one (PyTorch's CPU allocator is
    plain malloc); larger blocks are mapped on their own and returned when freed, so they cost fresh
    pages but never stay resident. Affects this process and the workers it forks; the resident size
    stays at the heap's peak instead of shrinking between steps. Returns whether it took effect (False
    off glibc)."""
    return set_freed_memory_kept(True, largest)


def set_freed_memory_kept(on: bool, largest: int = 1 << 30) -> bool:
    """:func:`keep_freed_memory` (``on``), or glibc's initial thresholds back (128 KiB: large blocks
    mmapped and trimmed; glibc then no longer raises them by itself, which only matters for blocks
    under 32 MiB). Returns whether freed memory is now kept."""
    global _kept
    mallopt = _glibc("mallopt")
    if mallopt is None or (not on and not _kept):
        return False
    if not on:
        mallopt(_M_MMAP_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
        mallopt(_M_TRIM_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
        _kept = False
        return False
    # older glibc refuses thresholds above 32 MiB; tensors larger than the one accepted stay mmapped
    mmap_ok = any(mallopt(_M_MMAP_THRESHOLD, size) for size in (largest, min(largest, 32 << 20)))
    _kept = mmap_ok and bool(mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
    return _kept


def return_free_memory(above: int = 0) -> bool:
    """Give the heap's free pages back to the system now (glibc's ``malloc_trim``), e.g. after loading
    a model, whose checkpoint copies are freed, if more than ``above`` bytes of the heap are free
    (glibc >= 2.33 says how many; older ones trim whenever asked); returns whether any were (False off
    glibc)."""
    trim = _glibc("malloc_trim")
    if trim is None:
        return False
    if above:
        free = heap_free_bytes()
        if free is not None and free <= above:
            return False
    return bool(trim(0))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def heap_free_bytes() -> int | None:
    """The bytes free in glibc's heap (all arenas; ``mallinfo2``), or None where it is not available."""
    info = _glibc("mallinfo2")
    if info is None:
        return None
    info.restype = _MallInfo2
    return int(info().fordblks)


def freed_memory_is_kept() -> bool:
    """Whether :func:`set_freed_memory_kept` last kept freed memory in this process."""
    return _kept


def compiled(model: nn.Module, purpose: str = "training") -> nn.Module:
    """``torch.compile`` for a fixed input shape (the patch and batch never change); the model itself
    (with a warning) when torch.compile cannot even be set up here."""
    try:
        return torch.compile(model, dynamic=False)
    except Exception as e:  # e.g. inductor failing to import its templates under a non-UTF-8 locale
        log.warning("torch.compile is not available (%s: %s); %s without it",
                    type(e).__name__, " ".join(str(e).split())[:200], purpose)
        return model


def is_compile_failure(exc: BaseException) -> bool:
    """Whether ``exc`` came from torch.compile's backend (e.g. no C++ compiler on this machine)."""
    from torch._dynamo.exc import BackendCompilerFailed, TorchDynamoException

    return isinstance(exc, (BackendCompilerFailed, TorchDynamoException))
