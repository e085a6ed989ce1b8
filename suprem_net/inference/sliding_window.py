"""Sliding-window inference as nnU-Net v2 does it, in torch.

* Tiles: along each axis ``n = ceil((size - patch) / (patch * step)) + 1`` positions, evenly
  spread between 0 and ``size - patch`` (rounded); the image is first zero-padded (centred) to
  at least the patch size and the padding is cut off again at the end.
* Every tile's logits are weighted by a Gaussian importance map (sigma = patch / 8, centred on
  ``patch // 2``, minimum clamped to the smallest positive value so no voxel gets weight 0) and
  accumulated; the result is divided by the accumulated weights.
* Test-time augmentation: mirroring over any subset of the three spatial axes (8 forwards with
  all three); the flipped copies of a tile batch go through the network in the same forward
  (halved on out-of-memory), and are averaged before the Gaussian weighting.
* Networks whose normalisation uses the statistics of the batch (SuPreM's UNet3D with
  ``batch_stats_always``) must see one sample per forward: ``batch_independent=False``.
* Accumulation: on CUDA/MPS in float16 (as nnU-Net: 10 mantissa bits, so logits keep ~3
  significant digits, far finer than any argmax tie that matters; the range is ample since
  the Gaussian weights are <= 1 and at most a handful of tiles overlap; bfloat16 would only
  keep ~2 digits). On CPU in float32, or float16 if the buffer would not fit comfortably in RAM.
  If the device runs out of memory for the buffers, accumulation moves to the CPU.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

logger = logging.getLogger(__name__)


def compute_steps(image_size: Sequence[int], patch_size: Sequence[int], step_size: float) -> list[list[int]]:
    """Tile start positions per axis (nnU-Net's ``compute_steps_for_sliding_window``)."""
    if not 0 < step_size <= 1:
        raise ValueError("step_size must be in (0, 1]")
    steps = []
    for size, patch in zip(image_size, patch_size):
        if size < patch:
            raise ValueError("image must be padded to at least the patch size")
        n = int(math.ceil((size - patch) / (patch * step_size))) + 1
        actual = (size - patch) / (n - 1) if n > 1 else 0.0
        steps.append([int(round(actual * i)) for i in range(n)])
    return steps


def gaussian_weights(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Separable Gaussian importance map of ``patch_size``, maximum 1, no zeros."""
    g = None
    for p in patch_size:
        x = torch.arange(p, dtype=torch.float64) - p // 2
        sigma = p * sigma_scale
        a = torch.exp(-0.5 * (x / sigma) ** 2)
        g = a if g is None else g[..., None] * a
    g = g / g.max()
    g = torch.clamp(g, min=float(g[g > 0].min()))
    return g.to(device=device, dtype=dtype)


def mirror_combinations(axes: Sequence[int] | None) -> list[tuple[int, ...]]:
    """All subsets of the spatial ``axes`` (0..2), the empty one (no flip) first."""
    if not axes:
        return [()]
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(sorted(axes), r)]


def _available_ram() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


def accumulation_dtype(device: torch.device, numel: int) -> torch.dtype:
    """float16 on accelerators; float32 on CPU unless it would take over half the free RAM."""
    if device.type != "cpu":
        return torch.float16
    return torch.float32 if numel * 4 < _available_ram() // 2 else torch.float16


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class SlidingWindow:
    """Run ``net`` over a preprocessed case tile by tile and return the merged logits."""

    def __init__(self, patch_size: Sequence[int], num_classes: int, *, step_size: float = 0.5,
                 tile_batch_size: int = 1, mirror_axes: Sequence[int] | None = (0, 1, 2),
                 batch_independent: bool = True, device: torch.device | str = "cpu",
                 autocast_dtype: torch.dtype | None = None) -> None:
        self.patch_size = [int(p) for p in patch_size]
        self.num_classes = int(num_classes)
        self.step_size = float(step_size)
        self.batch_independent = batch_independent
        self.tile_batch_size = max(1, int(tile_batch_size)) if batch_independent else 1
        self.mirrors = mirror_combinations(mirror_axes)
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self._gauss = gaussian_weights(self.patch_size, device=self.device)

    # -- forward ------------------------------------------------------------------------
    def _net(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Forward a batch, halving it on out-of-memory (only for batch-independent nets)."""
        try:
            if self.autocast_dtype is not None:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                    out = net(x)
            else:
                out = net(x)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _is_oom(e) or x.shape[0] == 1 or not self.batch_independent:
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = x.shape[0] // 2
            logger.debug("out of memory on a batch of %d tiles; splitting", x.shape[0])
            return torch.cat([self._net(net, x[:half]), self._net(net, x[half:])])
        if isinstance(out, (list, tuple)):  # deep supervision: full resolution comes first
            out = out[0]
        return out.float()

    def _predict_tiles(self, net: nn.Module, tiles: torch.Tensor) -> torch.Tensor:
        """Mean logits over the mirror set for a batch of tiles (B, C, *patch)."""
        b = tiles.shape[0]
        if self.batch_independent:
            batch = torch.cat([torch.flip(tiles, [2 + a for a in m]) if m else tiles for m in self.mirrors])
            out = self._net(net, batch)
            acc = None
            for i, m in enumerate(self.mirrors):
                part = out[i * b:(i + 1) * b]
                part = torch.flip(part, [2 + a for a in m]) if m else part
                acc = part if acc is None else acc + part
        else:
            acc = None
            for m in self.mirrors:
                parts = []
                for j in range(b):
                    t = tiles[j:j + 1]
                    t = torch.flip(t, [2 + a for a in m]) if m else t
                    o = self._net(net, t)
                    parts.append(torch.flip(o, [2 + a for a in m]) if m else o)
                part = torch.cat(parts)
                acc = part if acc is None else acc + part
        return acc / len(self.mirrors)

    # -- the window ---------------------------------------------------------------------
    def _pad(self, data: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
        shape = data.shape[1:]
        pads, keep = [], []
        for s, p in zip(shape, self.patch_size):
            diff = max(0, p - s)
            lo = diff // 2
            pads.append((lo, diff - lo))
            keep.append(slice(lo, lo + s))
        if any(sum(p) for p in pads):
            flat = [v for lo_hi in reversed(pads) for v in lo_hi]
            data = torch.nn.functional.pad(data, flat, value=0.0)
        return data, tuple(keep)

    @torch.inference_mode()
    def __call__(self, net: nn.Module, data: torch.Tensor | np.ndarray,
                 accumulate_on: torch.device | str | None = None) -> torch.Tensor:
        """Logits (K, Z, Y, X) for ``data`` (C, Z, Y, X); float32 on CPU, else the accumulation dtype.

        ``accumulate_on`` forces where the logit sum lives (default: the compute device, with
        a fallback to the CPU when the device runs out of memory).
        """
        if isinstance(data, np.ndarray):
            data = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        data, keep = self._pad(data.float())
        if accumulate_on is None:
            try:
                return self._run(net, data, keep, self.device)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not _is_oom(e) or self.device.type == "cpu":
                    raise
                logger.warning("out of memory on %s; accumulating the logits on the CPU instead", self.device)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                accumulate_on = "cpu"
        return self._run(net, data, keep, torch.device(accumulate_on))

    def _run(self, net: nn.Module, data: torch.Tensor, keep: tuple[slice, ...], acc_dev: torch.device) -> torch.Tensor:
        shape = tuple(data.shape[1:])
        numel = self.num_classes * int(np.prod(shape))
        acc_dtype = accumulation_dtype(acc_dev, numel)
        logits = torch.zeros((self.num_classes, *shape), dtype=acc_dtype, device=acc_dev)
        weights = torch.zeros(shape, dtype=torch.float32, device=acc_dev)
        gauss_acc = self._gauss.to(acc_dev)
        # the image stays on the compute device if it fits, else tiles are moved one by one
        try:
            src = data.to(self.device)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _is_oom(e):
                raise
            src = data
        steps = compute_steps(shape, self.patch_size, self.step_size)
        starts = list(itertools.product(*steps))
        logger.debug("sliding window: %d tiles of %s over %s, %d mirrors", len(starts), self.patch_size,
                     list(shape), len(self.mirrors))
        for i in range(0, len(starts), self.tile_batch_size):
            chunk = starts[i:i + self.tile_batch_size]
            sls = [tuple(slice(s, s + p) for s, p in zip(st, self.patch_size)) for st in chunk]
            tiles = torch.stack([src[(slice(None),) + sl] for sl in sls]).to(self.device)
            out = self._predict_tiles(net, tiles) * self._gauss
            out = out.to(acc_dev)
            for j, sl in enumerate(sls):
                logits[(slice(None),) + sl] += out[j].to(acc_dtype)
                weights[sl] += gauss_acc
        logits = logits[(slice(None),) + keep]
        weights = weights[keep]
        if acc_dtype == torch.float32:
            logits /= weights
        else:  # divide slab by slab to avoid a float32 copy of the whole buffer
            for z in range(logits.shape[1]):
                logits[:, z] = (logits[:, z].float() / weights[z]).to(acc_dtype)
        return logits
