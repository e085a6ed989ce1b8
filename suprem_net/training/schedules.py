"""Optimiser and per-epoch learning-rate schedule from ``plan["training"]``.

Each parameter group carries ``lr_scale`` (the encoder's ``--encoder-lr-scale``); the
schedule sets ``lr = base_lr * factor(epoch) * lr_scale``. Its state is just the epoch.
"""
from __future__ import annotations

import math

import torch

from suprem_net.errors import SupremError
from suprem_net.plan import OPTIMIZERS, optimizer_settings


def make_optimizer(groups: list[dict], cfg: dict) -> torch.optim.Optimizer:
    """``groups``: [{"params": [...], "lr_scale": s}, ...]; ``cfg``: the plan's training entry (+ overrides)."""
    if cfg["optimizer"] not in OPTIMIZERS:
        raise SupremError(f"plan training.optimizer {cfg['optimizer']!r}: choose {' or '.join(OPTIMIZERS)}")
    cfg = optimizer_settings(cfg)
    lr = float(cfg["lr"])
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=float(cfg["weight_decay"]))
    # fused: one kernel over all tensors, cheaper than the per-tensor loop on the CPU
    params = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.SGD(groups, lr=lr, momentum=float(cfg["momentum"]), nesterov=bool(cfg["nesterov"]),
                           weight_decay=float(cfg["weight_decay"]), fused=fused)


def lr_factor(cfg: dict, epoch: int, epochs: int) -> float:
    schedule = cfg.get("schedule", "poly")
    if schedule == "poly":
        return (1 - epoch / epochs) ** float(cfg.get("poly_exponent", 0.9))
    if schedule == "warmup_cosine":
        warm = min(int(cfg.get("warmup_epochs", 0)), max(0, epochs - 1))
        if epoch < warm:
            return (epoch + 1) / (warm + 1)
        span = max(1, epochs - warm)
        return 0.5 * (1 + math.cos(math.pi * (epoch - warm) / span))
    if schedule == "constant":
        return 1.0
    raise SupremError(f"plan training.schedule {schedule!r}: choose poly, warmup_cosine or constant")


class EpochSchedule:
    """Sets the learning rate of every group at the start of each epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: dict, epochs: int):
        self.optimizer, self.cfg, self.epochs = optimizer, cfg, epochs
        self.base_lr = float(cfg["lr"])
        self.epoch = 0

    def set_epoch(self, epoch: int) -> float:
        self.epoch = epoch
        lr = self.base_lr * lr_factor(self.cfg, epoch, self.epochs)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "base_lr": self.base_lr, "epochs": self.epochs}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
