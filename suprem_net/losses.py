"""The training losses, built from the plan by :func:`make_loss` (the trainer and the planner's memory
model both use it).

* :class:`DiceCELoss` (``training.loss == "dice_ce"``, the default of label-map plans): cross-entropy
  plus ``1 - soft Dice`` over the foreground classes, TP/FP/FN summed over the batch (nnU-Net's).
* :class:`MarginalDiceCELoss`: the same, with the marginal rule of Shi et al. (2021) for partially
  labelled cases. In a case where classes U are not annotated, a voxel labelled background means
  "background or one of U": its cross-entropy uses ``log(p_background + sum_{u in U} p_u)``; voxels
  of annotated classes keep their own ``log p_c``. Dice terms of classes not annotated in a sample
  are dropped (batch Dice over the samples that annotate the class). Without an ``annotated`` matrix
  it is exactly :class:`DiceCELoss`.
* :class:`MultiLabelDiceBCE` (``"dice_bce"``, bitmask plans): SuPreM's pre-training loss. Per sample
  and class: sigmoid Dice ``2 sum(p t) / (sum p + sum t + 1)``, averaged over the (sample, class)
  pairs whose class is present in that sample's target, plus binary cross-entropy averaged over all
  (sample, class) pairs; the two are summed. With an ``annotated`` matrix (B, C) a (sample, class)
  pair whose class is not annotated in that case contributes nothing: its loss terms are multiplied
  by 0, so its gradient is exactly 0. This is what lets several partially labelled datasets be pooled.
* :class:`SegmentationLoss` applies one of them with nnU-Net's deep supervision.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from suprem_net.errors import SupremError
from suprem_net.labels import LabelScheme, unpack16

LOSSES = ("dice_ce", "dice_bce")


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


def downsample_target(target: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour downsampling of (B, L, ...) labels to the spatial ``size``."""
    if tuple(target.shape[2:]) == tuple(size):
        return target
    return F.interpolate(target.float(), size=tuple(size), mode="nearest").to(target.dtype)


class SegmentationLoss(nn.Module):
    """Applies ``base`` (default :class:`DiceCELoss`) to one output, or to every deep-supervision output
    with weights :func:`deep_supervision_weights` and the labels downsampled (nearest neighbour) to
    each output's size."""

    def __init__(self, base: nn.Module | None = None):
        super().__init__()
        self.base = base if base is not None else DiceCELoss()

    def _base(self, output, target, annotated):
        return self.base(output, target) if annotated is None else self.base(output, target, annotated)

    def targets(self, output, target: torch.Tensor):
        if not isinstance(output, (list, tuple)):
            return target
        return [downsample_target(target, o.shape[2:]) for o in output]

    def forward(self, output, target: torch.Tensor, annotated: torch.Tensor | None = None) -> torch.Tensor:
        """``annotated`` (B, K) bool: per sample, which output channels its case annotates (partial
        labels); only :class:`MultiLabelDiceBCE` and :class:`MarginalDiceCELoss` accept it."""
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


def _spatial_dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, x.ndim))


class MultiLabelDiceBCE(nn.Module):
    """Sigmoid Dice (over classes present per sample) + BCE (over all classes), masked per
    (sample, class) by ``annotated``; ``target`` is the loader's packed bitmask (B, ceil(C/16), ...)."""

    def __init__(self, num_classes: int, smooth: float = 1.0):
        super().__init__()
        self.num_classes, self.smooth = int(num_classes), smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                annotated: torch.Tensor | None = None) -> torch.Tensor:
        x = logits.float()
        t = unpack16(target, self.num_classes).to(x.device)
        if t.shape != x.shape:
            raise RuntimeError(f"multi-label logits {tuple(x.shape)} vs target {tuple(t.shape)}")
        w = torch.ones(x.shape[:2], device=x.device) if annotated is None else annotated.to(x.device).float()
        dims = _spatial_dims(x)
        bce = F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(dims)  # (B, C)
        bce = (bce * w).sum() / w.sum().clamp_min(1.0)
        p = torch.sigmoid(x)
        t_sum = t.sum(dims)
        dice = 2 * (p * t).sum(dims) / (p.sum(dims) + t_sum + self.smooth)
        present = (t_sum > 0).float() * w
        dice_loss = ((1 - dice) * present).sum() / present.sum().clamp_min(1.0)
        return dice_loss + bce


class MarginalDiceCELoss(nn.Module):
    """:class:`DiceCELoss` with the marginal rule for partially labelled cases (module docstring)."""

    def __init__(self, smooth: float = 1e-5):
        super().__init__()
        self.plain = DiceCELoss(smooth=smooth, batch_dice=True)
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                annotated: torch.Tensor | None = None) -> torch.Tensor:
        if annotated is None:
            return self.plain(logits, target)
        x = logits.float()
        b, k = x.shape[:2]
        view = (b, k) + (1,) * (x.ndim - 2)
        ann = annotated.to(x.device).bool()
        merge = ~ann
        merge[:, 0] = True  # background is merged with the classes this case does not annotate
        tgt = target[:, 0].long()
        logp = torch.log_softmax(x, 1)
        merged = torch.logsumexp(logp.masked_fill(~merge.view(view), float("-inf")), 1)
        own = logp.gather(1, tgt[:, None])[:, 0]
        in_merge = merge.gather(1, tgt.reshape(b, -1)).reshape(tgt.shape)
        ce = -torch.where(in_merge, merged, own).mean()
        probs = logp.exp()[:, 1:]
        onehot = F.one_hot(tgt, k).movedim(-1, 1)[:, 1:].to(probs.dtype)
        w = ann[:, 1:].to(probs.dtype).view((b, k - 1) + (1,) * (x.ndim - 2))
        dims = (0,) + _spatial_dims(x)
        tp = (probs * onehot * w).sum(dims)
        denom = ((probs + onehot) * w).sum(dims)
        dice = (2 * tp + self.smooth) / (denom + self.smooth).clamp_min(1e-8)
        valid = ann[:, 1:].any(0)
        dice_term = (1 - dice[valid].mean()) if bool(valid.any()) else x.sum() * 0
        return ce + dice_term


def build_loss(name: str, num_classes: int) -> SegmentationLoss:
    """Loss ``name`` (one of :data:`LOSSES`) for ``num_classes`` foreground classes, with deep supervision."""
    if name not in LOSSES:
        raise SupremError(f"training.loss {name!r}: choose {' or '.join(LOSSES)}")
    return SegmentationLoss(MultiLabelDiceBCE(num_classes) if name == "dice_bce" else MarginalDiceCELoss())


def make_loss(plan: dict) -> SegmentationLoss:
    """The plan's loss (``training.loss``, default :attr:`LabelScheme.default_loss`) with deep supervision."""
    scheme = LabelScheme.of(plan)
    name = plan["training"].get("loss", scheme.default_loss)
    if name in LOSSES and name != scheme.default_loss:
        raise SupremError(f"training.loss {name!r} needs a "
                          f"{'label-map' if scheme.multi_label else 'multi-label (bitmask)'} plan")
    return build_loss(name, scheme.num_classes)
