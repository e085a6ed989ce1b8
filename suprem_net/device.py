"""Which torch device a command runs on: the one resolver of ``--device`` for every stage."""
from __future__ import annotations

import torch

from suprem_net.errors import SupremError


def _available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return kind == "cpu"


def resolve_device(name: str | torch.device = "auto", kinds: tuple[str, ...] = ("cuda", "mps", "cpu")) -> torch.device:
    """``auto`` -> the first available of ``kinds`` (CUDA, else MPS, else the CPU); a named device that
    is not available here is a user error."""
    text = str(name)
    if text == "auto":
        return torch.device(next(k for k in kinds if _available(k)))
    device = torch.device(text)
    if device.type not in kinds:
        raise SupremError(f"--device {text}: choose one of auto, {', '.join(kinds)}")
    if not _available(device.type):
        raise SupremError(f"--device {text}: no {device.type.upper()} device is available (use --device cpu)")
    return device
