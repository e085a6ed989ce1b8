"""Where datasets, preprocessed data and results live.

Each location comes from a CLI flag, else an environment variable (``SUPREM_raw``,
``SUPREM_preprocessed``, ``SUPREM_results``), else the documented default
``./suprem_data/{raw,preprocessed,results}`` under the current directory.
Nothing is read at import time.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from suprem_net.errors import SupremError

_DEFAULT_ROOT = "suprem_data"
_KINDS = ("raw", "preprocessed", "results")


def location(kind: str, override: str | os.PathLike | None = None) -> Path:
    """Return the folder for ``kind`` (raw, preprocessed or results)."""
    if kind not in _KINDS:
        raise ValueError(kind)
    if override:
        return Path(override)
    env = os.environ.get(f"SUPREM_{kind}")
    if env:
        return Path(env)
    return Path.cwd() / _DEFAULT_ROOT / kind


def resolve_dataset_name(dataset: str, *roots: Path | None) -> str:
    """Turn ``-d 3``, ``-d 003`` or ``-d Dataset003_Liver`` into the full folder name, looking for
    ``Dataset003_*`` in ``roots`` (e.g. the raw and preprocessed folders, or the results folder)."""
    dataset = str(dataset).strip()
    if re.fullmatch(r"Dataset\d{3}_.+", dataset):
        return dataset
    if not re.fullmatch(r"\d{1,3}", dataset):
        raise SupremError(f"dataset {dataset!r}: give a number (e.g. 3) or a full name (e.g. Dataset003_Liver)")
    prefix = f"Dataset{int(dataset):03d}_"
    candidates: set[str] = set()
    for root in roots:
        if root is not None and root.is_dir():
            candidates.update(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix))
    if not candidates:
        searched = ", ".join(str(r) for r in roots if r is not None)
        raise SupremError(f"dataset {dataset}: no folder {prefix}* in {searched} "
                          "(set SUPREM_raw / SUPREM_preprocessed / SUPREM_results or pass --raw / --preprocessed / "
                          "--results)")
    if len(candidates) > 1:
        raise SupremError(f"dataset {dataset}: several folders match: {', '.join(sorted(candidates))}")
    return candidates.pop()


def dataset_number(name: str) -> str:
    """``Dataset003_Liver`` -> ``"3"``: the number a command's ``-d`` takes."""
    m = re.fullmatch(r"Dataset(\d{3})_.+", name)
    if m is None:
        raise ValueError(f"not a dataset folder name: {name!r}")
    return str(int(m.group(1)))
