"""Checkpoints: written atomically, readable with ``torch.load(..., weights_only=True)``.

Contents: ``network_weights`` (unwrapped from DDP), ``optimizer_state``, ``scheduler_state``,
``scaler_state``, ``epoch`` (the next epoch to run), ``rng_state`` (python / numpy / torch as
tensors, lists and ints), ``logging`` (per-epoch lists), ``best_ema``, ``plans_name``, ``fold``;
with a time budget also ``time_budget`` (``budget_s``, ``spent_s``, ``epochs``, ``iterations_per_epoch``,
``num_val_iterations``: a resumed run keeps its epoch length and the time already spent).
"""
from __future__ import annotations

import errno
import logging
import random
from pathlib import Path

import numpy as np
import torch

from suprem_net.errors import SupremError
from suprem_net.io.checkpoint import load_checkpoint_file
from suprem_net.weights.loading import unwrap_model
from suprem_net.io.atomic import atomic_path

log = logging.getLogger(__name__)


def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss],
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s states (their tensors may have been loaded onto any device)."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: Path, *, model, optimizer, schedule, scaler, epoch: int, history: dict,
                    best_ema: float | None, plans_name: str, fold: str, time_budget: dict | None = None) -> None:
    ckpt = {
        "network_weights": unwrap_model(model).state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "scheduler_state": schedule.state_dict(),
        "scaler_state": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "rng_state": rng_state(),
        "logging": history,
        "best_ema": best_ema,
        "plans_name": plans_name,
        "fold": str(fold),
    }
    if time_budget is not None:
        ckpt["time_budget"] = time_budget
    with atomic_path(path) as tmp:
        try:
            torch.save(ckpt, tmp)
        except RuntimeError as e:  # torch's zip writer reports a failed write (full disk) this way
            raise OSError(errno.EIO, f"write failed, is the disk full? ({' '.join(str(e).split())[:120]})",
                          str(path)) from None
    log.debug("wrote %s", path)


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint, on the CPU (:func:`restore` moves each part to its device)."""
    ckpt = load_checkpoint_file(path)
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise SupremError(f"{path}: not a suprem_net checkpoint (no 'network_weights')")
    return ckpt


def restore(ckpt: dict, *, model, optimizer, schedule, scaler) -> None:
    unwrap_model(model).load_state_dict(ckpt["network_weights"])
    optimizer.load_state_dict(ckpt["optimizer_state"])
    schedule.load_state_dict(ckpt["scheduler_state"])
    if scaler is not None and ckpt.get("scaler_state"):
        scaler.load_state_dict(ckpt["scaler_state"])
    set_rng_state(ckpt["rng_state"])
