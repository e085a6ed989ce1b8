"""Soft Dice (foreground classes) + cross-entropy, with nnU-Net-style deep supervision."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class DiceCELoss(nn.Module):
    """``CE + (1 - soft Dice)``; Dice over foreground classes, TP/FP/FN summed over the batch."""

    def __init__(self, smooth: float = 1e-5, batch_dice: bool = True):
        super().__init__()
        self.smooth, self.batch_dice = smooth, batch_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, K, ...), ``target`` (B, 1, ...) integer labels."""
        target = target[:, 0].long()
        ce = F.cross_entropy(logits.float(), target)
        probs = torch.softmax(logits.float(), 1)[:, 1:]
        onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
        dims = tuple(range(2, probs.ndim))
        if self.batch_dice:
            dims = (0,) + dims
        tp = (probs * onehot).sum(dims)
        denom = probs.sum(dims) + onehot.sum(dims)
        dice = (2 * tp + self.smooth) / (denom + self.smooth).clamp_min(1e-8)
        return ce + (1 - dice.mean())


def deep_supervision_weights(n: int) -> list[float]:
    """1/2^i for output i (0 = full resolution), 0 for the lowest resolution, normalised to sum 1."""
    w = np.array([1 / 2 ** i for i in range(n)])
    if n > 1:
        w[-1] = 0
    return (w / w.sum()).tolist()


def deep_supervision_scales(strides, n_outputs: int) -> list[list[int]]:
    """Downsampling factor (per axis) of each decoder output: cumulative product of the plan's strides."""
    cum = np.cumprod(np.asarray(strides, dtype=int), axis=0)
    return [cum[i].tolist() for i in range(n_outputs)]


def downsample_target(target: torch.Tensor, scale) -> torch.Tensor:
    """Nearest-neighbour downsampling of (B, 1, Z, Y, X) labels by integer factors."""
    if all(s == 1 for s in scale):
        return target
    size = [t // s for t, s in zip(target.shape[2:], scale)]
    return F.interpolate(target.float(), size=size, mode="nearest").to(target.dtype)


class SegmentationLoss(nn.Module):
    """Applies :class:`DiceCELoss` to one output, or to every deep-supervision output with
    weights :func:`deep_supervision_weights` and targets downsampled per the plan's strides."""

    def __init__(self, strides=None, base: nn.Module | None = None):
        super().__init__()
        self.base = base if base is not None else DiceCELoss()
        self.strides = strides

    def _base(self, output, target, annotated):
        return self.base(output, target) if annotated is None else self.base(output, target, annotated)

    def targets(self, output, target: torch.Tensor):
        if not isinstance(output, (list, tuple)):
            return target
        if self.strides is not None:
            scales = deep_supervision_scales(self.strides, len(output))
            return [downsample_target(target, s) for s in scales]
        return [target if o.shape[2:] == target.shape[2:] else
                F.interpolate(target.float(), size=o.shape[2:], mode="nearest").to(target.dtype) for o in output]

    def forward(self, output, target: torch.Tensor, annotated: torch.Tensor | None = None) -> torch.Tensor:
        """``annotated`` (B, K) bool: per sample, which output channels its case annotates (partial
        labels); only the losses of :mod:`suprem_net.training.multilabel_loss` accept it."""
        if not isinstance(output, (list, tuple)):
            return self._base(output, target, annotated)
        targets = self.targets(output, target)
        weights = deep_supervision_weights(len(output))
        total = 0.0
        for w, o, t in zip(weights, output, targets):
            if w > 0:
                if o.shape[2:] != t.shape[2:]:
                    raise RuntimeError(f"deep supervision output {tuple(o.shape)} vs target {tuple(t.shape)}")
                total = total + w * self._base(o, t, annotated)
        return total
