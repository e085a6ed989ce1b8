"""Pseudo-Dice statistics during training for softmax and multi-label (sigmoid) plans.

Softmax: the prediction is the argmax, classes 1..K-1 are scored. Multi-label (bitmask plans):
class c is predicted where sigmoid > 0.5 (logit > 0), independently of the others, and
classes 1..C are scored. With an ``annotated`` matrix (partial labels), a class is scored
only on the samples whose case annotates it.
"""
from __future__ import annotations

import torch

from suprem_net.labels import LabelScheme, unpack16


def confusion_stats(logits: torch.Tensor, target: torch.Tensor, scheme: LabelScheme,
                    annotated: torch.Tensor | None = None) -> torch.Tensor:
    """(3, C) float64: TP, FP, FN per foreground class, summed over the batch."""
    n = scheme.num_classes
    if scheme.multi_label:
        pred = logits > 0
        truth = unpack16(target, n).to(logits.device) > 0.5
    else:
        k = logits.shape[1]
        pred = torch.nn.functional.one_hot(logits.argmax(1), k).movedim(-1, 1)[:, 1:].bool()
        truth = torch.nn.functional.one_hot(target[:, 0].long(), k).movedim(-1, 1)[:, 1:].bool()
    dims = tuple(range(2, pred.ndim))
    per_sample = torch.stack([(pred & truth).sum(dims), (pred & ~truth).sum(dims), (~pred & truth).sum(dims)])
    per_sample = per_sample.to(torch.float64)  # (3, B, n)
    if annotated is not None:
        first = scheme.first_scored_output
        per_sample = per_sample * annotated[:, first:first + n].to(per_sample.device, torch.float64)[None]
    return per_sample.sum(1)
