"""From logits on the preprocessed grid back to the original image, and onto disk.

:func:`revert_logits` mirrors :func:`suprem_net.preprocessing.case.revert_labels`: resample
to the cropped grid (linear, nearest along a separate low-resolution axis: the same
separable resize as preprocessing), argmax, paste into the crop box (background outside),
undo the orientation. It takes the logits as a whole tensor or as the stream of slabs along the
first axis that :meth:`~suprem_net.inference.sliding_window.SlidingWindow.slabs` yields, and works
slab by slab: the first axis is resized as planes arrive (a target plane needs at most its two
source planes, :class:`AxisResampler`), ``slab`` target planes at a time, each slab then in-plane,
so at most K x ``slab`` x Y x X floats of the original resolution exist at once and the logits of
the whole case never do. Separable linear/nearest interpolation is a tensor product, so this order gives
the same result as resizing the whole volume at once.

Probabilities (``--save-probabilities``) are the softmax of the resampled logits, stored as
float16 in an ``.npz`` (key ``probabilities``, shape (K, Z, Y, X) in the original geometry's
array order; outside the crop box background = 1) together with ``labels`` (class names): the
one output that holds every class at full resolution, so only when asked for.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from suprem_net.io.atomic import atomic_path
from suprem_net.io.image import Geometry, write_image
from suprem_net.preprocessing import orientation as ori
from suprem_net.preprocessing.resampling import resize_axis
from suprem_net.timing import NO_TIMES, StageTimes

logger = logging.getLogger(__name__)

# target planes of the original resolution made at a time: K x 4 x 512 x 512 float32 is 29 MB for
# 7 classes, under the prediction's heap limit (speed.PREDICTION_HEAP_LIMIT), so the slabs reuse memory
REVERT_SLAB = 4


def _mode(axis: int, z_axis: int | None) -> str:
    return "nearest" if axis == z_axis else "linear"


def axis_sources(n_in: int, n_out: int, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i0, i1, w)`` per target index: the target is ``src[i0] * (1 - w) + src[i1] * w``, as
    ``F.interpolate`` computes it (``bilinear`` with ``align_corners=False``, or ``nearest-exact``),
    in float32."""
    t = np.arange(n_out, dtype=np.float32)
    scale = np.float32(n_in) / np.float32(n_out)
    if mode == "nearest":
        i0 = np.minimum(np.floor((t + np.float32(0.5)) * scale).astype(np.int64), n_in - 1)
        return i0, i0, np.zeros(n_out, dtype=np.float32)
    src = np.maximum(scale * (t + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.floor(src).astype(np.int64)
    w = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, np.minimum(i0 + 1, n_in - 1), w


class AxisResampler:
    """Resize the first spatial axis of a stream of slabs (K, n, y, x) from ``n_in`` to ``n_out``
    planes, handing on each target plane as soon as its source planes have arrived."""

    def __init__(self, n_in: int, n_out: int, mode: str) -> None:
        self.i0, self.i1, self.w = axis_sources(n_in, n_out, mode)
        self.n_out = n_out
        self.buf: torch.Tensor | None = None
        self.first = 0       # source index of buf[:, 0]
        self.needed = 0      # the first source plane that a target still to come needs
        self.done = 0        # target planes handed on

    def push(self, first: int, part: torch.Tensor, most: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Add source planes [first, first + n) (in order); return the targets now complete as
        ``(first target, planes)``, at most ``most`` planes at a time, each computed when asked for."""
        if self.buf is None:
            self.buf, self.first = part, first
        else:
            self.buf = torch.cat([self.buf, part], dim=1)
        drop = min(self.needed - self.first, self.buf.shape[1])  # planes no target still to come needs
        if drop > 0:
            self.buf, self.first = self.buf[:, drop:], self.first + drop
        end = int(np.searchsorted(self.i1, first + part.shape[1]))  # targets whose sources have all arrived
        start, self.done = self.done, max(self.done, end)
        if end < self.n_out:
            self.needed = int(self.i0[end])
        return self._targets(self.buf, self.first, start, end, most or max(end - start, 1))

    def _targets(self, buf: torch.Tensor, first: int, start: int, end: int, step: int):
        for a in range(start, end, step):
            t = slice(a, min(a + step, end))
            out = buf.index_select(1, torch.from_numpy(self.i0[t] - first).to(buf.device))
            if self.w[t].any():
                w = torch.from_numpy(self.w[t]).to(buf.device).view(1, -1, 1, 1)
                out = out * (1 - w) + buf.index_select(1, torch.from_numpy(self.i1[t] - first).to(buf.device)) * w
            yield a, out


def _as_slabs(logits) -> Iterable[tuple[int, torch.Tensor]]:
    return [(0, logits)] if isinstance(logits, torch.Tensor) else logits


def resampled_slabs(logits, props: dict, slab: int = REVERT_SLAB, times: StageTimes = NO_TIMES):
    """Yield ``(z slice in the oriented original grid, logits (K, dz, Y, X) float32)`` slab by slab.

    ``logits``: a tensor (K, z, y, x) on the preprocessed grid, or its slabs ``(first plane, (K, n, y, x))``
    in order along the first axis. The first array axis is resized as the planes arrive, at the low
    in-plane resolution and ``slab`` target planes at a time, then each slab in-plane, so at most
    K x ``slab`` x Y x X original-resolution floats exist at once.
    """
    target = [int(s) for s in props["shape_after_crop"]]
    z_axis = props["separate_z_axis"]
    z_start = props["bbox"][0][0]
    axis0 = None
    with torch.inference_mode():
        for first, part in _as_slabs(logits):
            if axis0 is None:
                axis0 = AxisResampler(int(props["shape_after_resample"][0]), target[0], _mode(0, z_axis))
            planes = axis0.push(first, part.float(), slab)
            while True:
                with times("revert"):
                    got = next(planes, None)
                    if got is None:
                        break
                    t0, piece = got
                    piece = resize_axis(piece, 1, target[1], _mode(1, z_axis))
                    piece = resize_axis(piece, 2, target[2], _mode(2, z_axis))
                yield slice(z_start + t0, z_start + t0 + piece.shape[1]), piece


def argmax_labels(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(0)`` as uint8 (the first class wins a tie, as argmax): one running comparison per
    class, an order of magnitude faster on the CPU than torch's argmax over the leading dimension."""
    best = logits[0].clone()
    labels = torch.zeros(logits.shape[1:], dtype=torch.uint8, device=logits.device)
    for k in range(1, logits.shape[0]):
        labels.masked_fill_(logits[k] > best, k)
        torch.maximum(best, logits[k], out=best)
    return labels


def revert_logits(logits, props: dict, *, probabilities: bool = False, slab: int = REVERT_SLAB,
                  times: StageTimes = NO_TIMES) -> tuple[np.ndarray, np.ndarray | None]:
    """Return ``(labels uint8 (Z,Y,X), probabilities float16 (K,Z,Y,X) or None)`` in the
    original image grid, for ``logits`` (K, z, y, x) on the preprocessed grid, whole or as slabs
    (see :func:`resampled_slabs`)."""
    full = np.zeros(props["oriented_shape"], dtype=np.uint8)
    probs = None
    box = [slice(lo, hi) for lo, hi in props["bbox"]]
    for zs, part in resampled_slabs(logits, props, slab, times):
        with times("revert"):
            full[zs, box[1], box[2]] = argmax_labels(part).cpu().numpy()
            if probabilities:
                if probs is None:
                    probs = np.zeros((part.shape[0], *props["oriented_shape"]), dtype=np.float16)
                    probs[0] = 1.0
                probs[:, zs, box[1], box[2]] = torch.softmax(part, 0).half().cpu().numpy()
    with times("revert"):
        if props.get("orientation"):
            full = ori.restore(full, props["orientation"])
            if probs is not None:
                probs = ori.restore(probs, props["orientation"])
        return np.ascontiguousarray(full), (np.ascontiguousarray(probs) if probs is not None else None)


def write_labels(path: Path, labels: np.ndarray, geometry: Geometry) -> None:
    write_image(path, labels.astype(np.uint8, copy=False), geometry)


def write_per_organ(case_dir: Path, labels: np.ndarray, geometry: Geometry, class_names: dict[int, str]) -> None:
    """AbdomenAtlas layout: ``case_dir/segmentations/<class>.nii.gz`` (binary uint8) and
    ``case_dir/combined_labels.nii.gz`` (written last, so its presence means the case is done)."""
    for value, name in sorted(class_names.items()):
        if value == 0:
            continue
        write_image(case_dir / "segmentations" / f"{name}.nii.gz", (labels == value).astype(np.uint8), geometry)
    write_labels(case_dir / "combined_labels.nii.gz", labels, geometry)


def write_probabilities(path: Path, probs: np.ndarray, class_names: dict[int, str]) -> None:
    names = np.array([class_names.get(i, str(i)) for i in range(probs.shape[0])])
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, probabilities=probs, labels=names)
