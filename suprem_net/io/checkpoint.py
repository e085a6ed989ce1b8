"""Reading PyTorch checkpoint files, the one way: ``torch.load(..., weights_only=True)``, with at most
an explicit allow-list of classes scoped to that one read (never ``weights_only=False``), and every
problem reported in one line that names the file."""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from suprem_net.errors import SupremError

logger = logging.getLogger(__name__)

# prefixes that wrappers add to state-dict keys: DistributedDataParallel, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# keys under which checkpoints keep their state dict (student: the DINO student of a UniMiSS file)
WRAPPER_KEYS = ("net", "state_dict", "model", "network_weights", "student")
# the one class a checkpoint may hold besides tensors and containers: UniMiSS files keep their training
# arguments as an argparse.Namespace of plain values; it is allowed only for the read of such a file
NAMESPACE = argparse.Namespace


def load_checkpoint_file(path: str | os.PathLike, allowed: Iterable[type] = ()) -> object:
    """The unpickled contents of ``path`` on the CPU. ``allowed``: classes the weights-only unpickler
    may rebuild in this read (e.g. numpy scalars, ``argparse.Namespace``)."""
    path = Path(path)
    if not path.is_file():
        raise SupremError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = " ".join(str(e).split())
        detail = re.search(r"WeightsUnpickler error: (.*?)(?: Please use| Check the documentation|$)", text)
        detail_text = (detail.group(1) if detail else text)[:200].rstrip(". ")
        if "GLOBAL" in text or "global" in detail_text:
            raise SupremError(f"{path}: cannot load checkpoint: contains pickled code; refusing to load "
                              f"({detail_text}); if you trust it, re-save only its tensors with "
                              "torch.save(state_dict) and use that file") from None
        raise SupremError(f"{path}: cannot load checkpoint: not a readable PyTorch checkpoint ({detail_text})") from None
    except EOFError:
        raise SupremError(f"{path}: cannot load checkpoint: not a readable PyTorch checkpoint "
                          "(empty or truncated file)") from None
    except (RuntimeError, OSError, ValueError, KeyError, AttributeError) as e:
        raise SupremError(f"{path}: cannot load checkpoint: not a readable PyTorch checkpoint "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def strip_wrapper_prefixes(state: Mapping[str, object], prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> dict:
    """``state`` with the key prefixes of wrappers removed (repeatedly: ``module._orig_mod.x`` -> ``x``)."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for p in prefixes:
                if key.startswith(p):
                    key, stripped = key[len(p):], True
        out[key] = value
    return out


def read_state_dict(path: str | os.PathLike, allow_namespace: bool = False) -> dict[str, torch.Tensor]:
    """Load ``path`` with ``weights_only=True`` and return its tensor dict (wrappers unwrapped).

    ``allow_namespace``: allow ``argparse.Namespace`` (the training arguments of a UniMiSS file) in
    this read. Without it, a file refused for holding a Namespace and nothing else is read again with
    it allowed (a second read of the file)."""
    path = Path(path)
    try:
        obj = load_checkpoint_file(path, [NAMESPACE] if allow_namespace else [])
    except SupremError as e:
        if allow_namespace or f"{NAMESPACE.__module__}.{NAMESPACE.__name__}" not in str(e):
            raise
        logger.debug("%s stores an argparse.Namespace; reading it again with that class allowed", path)
        return read_state_dict(path, allow_namespace=True)
    seen = []
    while isinstance(obj, Mapping):
        inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        seen.append(inner)
        obj = obj[inner]
    if not isinstance(obj, Mapping):
        raise SupremError(f"{path}: not a state dict (found {type(obj).__name__})")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        top = ", ".join(list(map(str, obj))[:8])
        raise SupremError(f"{path}: no tensors found (keys: {top or 'none'})")
    logger.debug("%s: %d tensors under %s", path, len(tensors), "/".join(seen) or "top level")
    return tensors
