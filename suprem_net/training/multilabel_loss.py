"""Losses for multi-label (sigmoid) training and for partially labelled cases.

* :class:`MultiLabelDiceBCE` (plan ``training.loss == "dice_bce"``, bitmask plans): SuPreM's
  pre-training loss. Per sample and class: sigmoid Dice ``2 sum(p t) / (sum p + sum t + 1)``,
  averaged over the (sample, class) pairs whose class is present in that sample's target, plus
  binary cross-entropy averaged over all (sample, class) pairs; the two are summed. With an
  ``annotated`` matrix (B, C) a (sample, class) pair whose class is not annotated in that case
  contributes nothing: its loss terms are multiplied by 0, so its gradient is exactly 0. This
  is what lets several partially labelled datasets be pooled.
* :class:`MarginalDiceCELoss` (single-label plans whose dataset has ``partial_labels``): the
  marginal loss of Shi et al. (2021). In a case where classes U are not annotated, a voxel
  labelled background means "background or one of U": its cross-entropy uses
  ``log(p_background + sum_{u in U} p_u)``; voxels of annotated classes keep their own
  ``log p_c``. Dice terms of classes not annotated in a sample are dropped (batch Dice over
  the samples that annotate the class). Without an ``annotated`` matrix it is exactly
  :class:`suprem_net.training.losses.DiceCELoss`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from suprem_net.preprocessing.bitmask import unpack16
from suprem_net.training.losses import DiceCELoss, SegmentationLoss


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


def make_loss(plan: dict) -> SegmentationLoss:
    """The plan's loss with deep supervision: ``dice_bce`` (multi-label) or Dice + CE (default)."""
    family = plan["network"]["family"]
    strides = plan["network"].get("kwargs", {}).get("strides") if family in ("nnunet", "resenc") else None
    loss_name = plan["training"].get("loss", "dice_bce" if plan.get("label_encoding") == "bitmask" else "dice_ce")
    if loss_name == "dice_bce":
        if plan.get("label_encoding") != "bitmask":
            from suprem_net.errors import SupremError

            raise SupremError("training.loss 'dice_bce' needs a multi-label (bitmask) plan")
        return SegmentationLoss(strides, base=MultiLabelDiceBCE(plan["num_classes"]))
    if loss_name != "dice_ce":
        from suprem_net.errors import SupremError

        raise SupremError(f"training.loss {loss_name!r}: choose dice_ce or dice_bce")
    return SegmentationLoss(strides, base=MarginalDiceCELoss())
