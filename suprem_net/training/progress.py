"""Training feedback: the per-epoch history, ``training_log.txt`` and ``progress.png``."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from suprem_net.io.atomic import atomic_path

log = logging.getLogger(__name__)

EMA_DECAY = 0.9
HISTORY_KEYS = ("train_loss", "val_loss", "pseudo_dice", "ema_dice", "lr", "epoch_time", "data_wait")


def new_history() -> dict:
    return {k: [] for k in HISTORY_KEYS}


def pseudo_dice(tp, fp, fn) -> list[float]:
    """Per foreground class 2TP / (2TP + FP + FN); NaN where the class never occurred."""
    out = []
    for a, b, c in zip(tp, fp, fn):
        d = 2 * a + b + c
        out.append(float(2 * a / d) if d > 0 else float("nan"))
    return out


def update_ema(history: dict, dice: list[float]) -> float:
    finite = [d for d in dice if not math.isnan(d)]
    mean = float(np.mean(finite)) if finite else 0.0
    prev = history["ema_dice"][-1] if history["ema_dice"] else None
    return mean if prev is None else EMA_DECAY * prev + (1 - EMA_DECAY) * mean


def attach_log_file(path: Path) -> logging.Handler:
    """Send the package's log records to ``path`` (appending, so a resumed run continues it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("suprem_net")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handler


def detach_log_file(handler: logging.Handler) -> None:
    logging.getLogger("suprem_net").removeHandler(handler)
    handler.close()


def plot_progress(history: dict, path: Path, class_names: list[str] | None = None) -> None:
    """Losses, pseudo-Dice per class + EMA, learning rate and epoch time, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(len(history["train_loss"]))
    if len(epochs) == 0:
        return
    fig, axes = plt.subplots(4, 1, figsize=(10, 14), sharex=True)
    ax = axes[0]
    ax.plot(epochs, history["train_loss"], label="train loss")
    ax.plot(epochs, history["val_loss"], label="val loss")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    ax = axes[1]
    dice = np.array(history["pseudo_dice"], dtype=float)
    if dice.ndim == 2:
        for c in range(dice.shape[1]):
            name = class_names[c] if class_names and c < len(class_names) else f"class {c + 1}"
            ax.plot(epochs, dice[:, c], lw=0.8, alpha=0.7, label=name)
    ax.plot(epochs, history["ema_dice"], "k", lw=2, label="EMA (mean)")
    ax.set_ylabel("pseudo Dice")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize=7, ncol=2)
    axes[2].plot(epochs, history["lr"])
    axes[2].set_ylabel("learning rate")
    axes[3].plot(epochs, history["epoch_time"], label="epoch time")
    axes[3].plot(epochs, np.array(history["epoch_time"]) * np.array(history["data_wait"]), label="waiting for data")
    axes[3].set_ylabel("seconds")
    axes[3].set_xlabel("epoch")
    axes[3].legend(loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
