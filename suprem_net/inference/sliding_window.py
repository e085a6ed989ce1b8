"""Sliding-window inference as nnU-Net v2 does it, in torch, streamed along the first axis.

* Tiles: along each axis ``n = ceil((size - patch) / (patch * step)) + 1`` positions, evenly
  spread between 0 and ``size - patch`` (rounded); the image is first zero-padded (centred) to
  at least the patch size and the padding is cut off again at the end.
* Every tile's logits are weighted by a Gaussian importance map (sigma = patch / 8, centred on
  ``patch // 2``, minimum clamped to the smallest positive value so no voxel gets weight 0) and
  accumulated; the result is divided by the accumulated weights. Folds are averaged tile by tile
  (the mean of their logits, as the mean of whole-volume results would be: the steps are linear).
* Streaming: tiles run in the order of their position along the first axis, so once the tiles of
  a row have started at plane ``s``, every plane below ``s`` is final. :meth:`SlidingWindow.slabs`
  hands those planes on (divided by their weights) and keeps only a buffer of
  K x (patch + one row's spread) x Y x X sums, never the logits of the whole volume.
* Tiles may be left out (``keep_tile``, e.g. tiles that hold only air, see
  :mod:`suprem_net.preprocessing.body`): a voxel that no computed tile covers gets the ``background``
  channel (logit 0, every other channel -1e4; all channels -1e4 for multi-label models).
* Test-time augmentation: mirroring over any subset of the three spatial axes (8 forwards with
  all three); the flipped copies of a tile batch go through the network in the same forward
  (halved on out-of-memory), and are averaged before the Gaussian weighting.
* Networks whose normalisation uses the statistics of the batch (SuPreM's UNet3D with
  ``batch_stats_always``) must see one sample per forward: ``batch_independent=False``.
* Accumulation: on CUDA/MPS in float16 (as nnU-Net: 10 mantissa bits, so logits keep ~3
  significant digits, far finer than any argmax tie that matters; the range is ample since
  the Gaussian weights are <= 1 and at most a handful of tiles overlap; bfloat16 would only
  keep ~2 digits). On CPU in float32, or float16 if the buffer would not fit comfortably in RAM;
  ``accumulation_dtype`` overrides the choice. If the device runs out of memory for the buffer,
  accumulation moves to the CPU.
* ``after_forward`` runs after each batch's logits are added (the CPU predictor gives the heap's
  free pages back there, see :class:`~suprem_net.inference.predictor.Predictor`).
* Progress: with ``progress``, a tqdm bar of the tiles done, shown on a terminal once a case has
  taken ``PROGRESS_DELAY_S`` (a 96^3 U-Net case runs for half an hour on two CPU cores).
"""
from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from suprem_net.timing import NO_TIMES, StageTimes

logger = logging.getLogger(__name__)

PROGRESS_DELAY_S = 5.0  # the tile bar shows only for cases that take longer (on a terminal)


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


EMPTY_LOGIT = -1e4  # what a channel other than the background gets where no tile ran (fits float16)
RELEASE_PLANES = 8  # finished planes handed on at a time


class _Sums:
    """Gaussian-weighted logit sums and weight sums of the padded planes [base, base + depth) along
    the first axis; planes below ``base`` have been handed on, planes beyond are untouched zeros."""

    def __init__(self, k: int, depth: int, plane: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
        self.base, self.depth = 0, depth
        self.logits = torch.zeros((k, depth, *plane), dtype=dtype, device=device)
        self.weights = torch.zeros((depth, *plane), dtype=torch.float32, device=device)

    def add(self, start: Sequence[int], logits: torch.Tensor, gauss: torch.Tensor) -> None:
        z = start[0] - self.base
        sl = (slice(z, z + logits.shape[1]),) + tuple(slice(s, s + p) for s, p in zip(start[1:], logits.shape[2:]))
        self.logits[(slice(None),) + sl] += logits.to(self.logits.dtype)
        self.weights[sl] += gauss

    def ready(self, upto: int) -> int:
        """How many planes from ``base`` on are final once no tile starts before ``upto``."""
        return max(0, min(upto - self.base, self.depth))

    def advance(self, n: int) -> None:
        """Drop the first ``n`` planes (handed on): the rest moves to the front, in blocks of ``n``
        planes so that no copy of the buffer is needed; the zeros behind stand for the next planes."""
        rest = self.depth - n
        for i in range(0, rest, n):
            j = min(i + n, rest)
            self.logits[:, i:j] = self.logits[:, i + n:j + n]
            self.weights[i:j] = self.weights[i + n:j + n]
        self.logits[:, rest:] = 0
        self.weights[rest:] = 0
        self.base += n


class SlidingWindow:
    """Run one network (or the folds' networks) over a preprocessed case tile by tile."""

    def __init__(self, patch_size: Sequence[int], num_classes: int, *, step_size: float = 0.5,
                 tile_batch_size: int = 1, mirror_axes: Sequence[int] | None = (0, 1, 2),
                 batch_independent: bool = True, device: torch.device | str = "cpu",
                 autocast_dtype: torch.dtype | None = None, accumulation: torch.dtype | None = None,
                 background: int | None = 0, memory_format: torch.memory_format = torch.contiguous_format,
                 times: StageTimes = NO_TIMES, progress: bool = False,
                 after_forward: Callable[[], object] | None = None) -> None:
        self.patch_size = [int(p) for p in patch_size]
        self.num_classes = int(num_classes)
        self.step_size = float(step_size)
        self.batch_independent = batch_independent
        self.tile_batch_size = max(1, int(tile_batch_size)) if batch_independent else 1
        self.mirrors = mirror_combinations(mirror_axes)
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.accumulation = accumulation
        self.memory_format = memory_format
        self.times = times
        self.progress = progress
        self.after_forward = after_forward
        self._gauss = gaussian_weights(self.patch_size, device=self.device)
        fill = torch.full((self.num_classes,), EMPTY_LOGIT)
        if background is not None:
            fill[background] = 0.0
        self._fill = fill
        self.tiles_run = self.tiles_total = self.buffer_planes = 0  # of the last call

    # -- forward ------------------------------------------------------------------------
    def _net(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Forward a batch, halving it on out-of-memory (only for batch-independent nets)."""
        try:
            with self.times("network"):
                if self.autocast_dtype is not None:
                    with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                        out = net(x.contiguous(memory_format=self.memory_format))
                else:
                    out = net(x.contiguous(memory_format=self.memory_format))
                if isinstance(out, (list, tuple)):  # deep supervision: full resolution comes first
                    out = out[0]
                return out.float()
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _is_oom(e) or x.shape[0] == 1 or not self.batch_independent:
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = x.shape[0] // 2
            logger.debug("out of memory on a batch of %d tiles; splitting", x.shape[0])
            return torch.cat([self._net(net, x[:half]), self._net(net, x[half:])])

    def _predict_tiles(self, net: nn.Module, tiles: torch.Tensor) -> torch.Tensor:
        """Mean logits over the mirror set for a batch of tiles (B, C, *patch)."""
        b = tiles.shape[0]
        if self.batch_independent:
            with self.times("tiles"):
                batch = torch.cat([torch.flip(tiles, [2 + a for a in m]) if m else tiles for m in self.mirrors])
            out = self._net(net, batch)
            with self.times("tiles"):
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
        return acc / len(self.mirrors) if len(self.mirrors) > 1 else acc

    def _forward(self, nets: Sequence[nn.Module], tiles: torch.Tensor) -> torch.Tensor:
        total = None
        for net in nets:
            out = self._predict_tiles(net, tiles)
            total = out if total is None else total + out
        return total / len(nets) if len(nets) > 1 else total

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

    def _batches(self, shape: Sequence[int], keep: tuple[slice, ...], keep_tile) -> list[list[tuple[int, ...]]]:
        starts = list(itertools.product(*compute_steps(shape, self.patch_size, self.step_size)))
        self.tiles_total = len(starts)
        if keep_tile is not None:
            offset = [k.start for k in keep]
            starts = [s for s in starts if keep_tile([a - o for a, o in zip(s, offset)], self.patch_size)]
        self.tiles_run = len(starts)
        logger.debug("sliding window: %d of %d tiles of %s over %s, %d mirrors", len(starts), self.tiles_total,
                     self.patch_size, list(shape), len(self.mirrors))
        return [starts[i:i + self.tile_batch_size] for i in range(0, len(starts), self.tile_batch_size)]

    def _finish(self, first: int, logits: torch.Tensor, weights: torch.Tensor,
                keep: tuple[slice, ...]) -> tuple[int, torch.Tensor] | None:
        """The planes [first, first + n) divided by their weights, cut to the unpadded grid."""
        lo, hi = max(first, keep[0].start), min(first + logits.shape[1], keep[0].stop)
        if hi <= lo:
            return None
        z = slice(lo - first, hi - first)
        logits, weights = logits[:, z, keep[1], keep[2]], weights[z, keep[1], keep[2]]
        out = logits.float() / weights.clamp_min(torch.finfo(torch.float32).tiny)
        empty = weights == 0
        if bool(empty.any()):
            out = torch.where(empty, self._fill.to(out.device).view(-1, 1, 1, 1), out)
        return lo - keep[0].start, out

    def _sums(self, shape: Sequence[int], depth: int, acc_dev: torch.device) -> _Sums:
        numel = self.num_classes * depth * int(np.prod(shape[1:]))
        dtype = self.accumulation or accumulation_dtype(acc_dev, numel)
        return _Sums(self.num_classes, depth, shape[1:], dtype, acc_dev)

    @torch.inference_mode()
    def slabs(self, nets: nn.Module | Sequence[nn.Module], data: torch.Tensor | np.ndarray,
              keep_tile: Callable[[Sequence[int], Sequence[int]], bool] | None = None,
              accumulate_on: torch.device | str | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(first plane, logits (K, n, Y, X) float32)`` for ``data`` (C, Z, Y, X), in order
        along the first axis, each plane once and final: the mean over ``nets`` (the folds) of the
        Gaussian-weighted tile logits. ``keep_tile(start, size)`` (unpadded voxel coordinates) may
        leave tiles out. ``accumulate_on`` forces where the sums live (default: the compute device,
        the CPU if the device has no room for them)."""
        nets = list(nets) if isinstance(nets, (list, tuple)) else [nets]
        if isinstance(data, np.ndarray):
            data = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        data, keep = self._pad(data.float())
        shape = tuple(data.shape[1:])
        batches = self._batches(shape, keep, keep_tile)
        depth = min(shape[0], self.patch_size[0] + max((b[-1][0] - b[0][0] for b in batches), default=0))
        self.buffer_planes = depth
        acc_dev = torch.device(accumulate_on) if accumulate_on is not None else self.device
        try:
            sums = self._sums(shape, depth, acc_dev)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _is_oom(e) or acc_dev.type == "cpu":
                raise
            logger.warning("out of memory on %s; accumulating the logits on the CPU instead", acc_dev)
            acc_dev = torch.device("cpu")
            sums = self._sums(shape, depth, acc_dev)
        gauss_acc = self._gauss.to(acc_dev)
        # the image stays on the compute device if it fits, else tiles are moved one by one
        try:
            src = data.to(self.device)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _is_oom(e):
                raise
            src = data
        with tqdm(total=self.tiles_run, desc="tiles", unit="tile", leave=False, delay=PROGRESS_DELAY_S,
                  disable=None if self.progress else True) as bar:
            for batch in batches:
                yield from self._release(sums, batch[0][0], keep)
                with self.times("tiles"):
                    tiles = torch.stack([src[(slice(None),) + tuple(slice(s, s + p) for s, p in
                                                                    zip(st, self.patch_size))]
                                         for st in batch]).to(self.device)
                out = self._forward(nets, tiles)
                with self.times("accumulation"):
                    out = (out * self._gauss).to(acc_dev)
                    for j, st in enumerate(batch):
                        sums.add(st, out[j], gauss_acc)
                del out
                if self.after_forward is not None:
                    self.after_forward()
                bar.update(len(batch))
        yield from self._release(sums, shape[0], keep)

    def _release(self, sums: _Sums, upto: int, keep: tuple[slice, ...]) -> Iterator[tuple[int, torch.Tensor]]:
        """The planes that are final before a tile starting at ``upto``, ``RELEASE_PLANES`` at a time
        (each slab a new tensor, so the buffer may move on)."""
        while n := sums.ready(upto):
            for a in range(0, n, RELEASE_PLANES):
                b = min(a + RELEASE_PLANES, n)
                with self.times("accumulation"):
                    done = self._finish(sums.base + a, sums.logits[:, a:b], sums.weights[a:b], keep)
                if done is not None:
                    yield done
            with self.times("accumulation"):
                sums.advance(n)

    @torch.inference_mode()
    def __call__(self, nets: nn.Module | Sequence[nn.Module], data: torch.Tensor | np.ndarray,
                 accumulate_on: torch.device | str | None = None,
                 keep_tile: Callable[[Sequence[int], Sequence[int]], bool] | None = None) -> torch.Tensor:
        """Logits (K, Z, Y, X) for ``data`` (C, Z, Y, X), the whole volume at once: float32 on the CPU,
        else the accumulation dtype (see :meth:`slabs`)."""
        full = None
        for first, part in self.slabs(nets, data, keep_tile, accumulate_on):
            if full is None:
                dtype = torch.float32 if part.device.type == "cpu" else (self.accumulation or torch.float16)
                full = torch.empty((self.num_classes, *data.shape[1:]), dtype=dtype, device=part.device)
            full[:, first:first + part.shape[1]] = part.to(full.dtype)
        return full
