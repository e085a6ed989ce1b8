"""Largest-connected-component postprocessing per class (cc3d, 26-connectivity).

A model folder may hold ``postprocessing.json``: ``{"lcc_classes": [1, 3]}`` lists the label
values for which keeping only the largest connected component helped on validation
(nnU-Net's idea). Voxels of other components of such a class become background.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import cc3d
import numpy as np

from suprem_net.io.atomic import read_json
from suprem_net.errors import InputError

logger = logging.getLogger(__name__)

FILENAME = "postprocessing.json"


def read_lcc_classes(model_dir: Path) -> list[int]:
    """The classes ``postprocessing.json`` in ``model_dir`` marks for LCC ([] when absent)."""
    path = Path(model_dir) / FILENAME
    if not path.is_file():
        return []
    spec = read_json(path)
    classes = spec.get("lcc_classes") if isinstance(spec, dict) else None
    if not isinstance(classes, list) or not all(isinstance(c, int) for c in classes):
        raise InputError(path, 'expected {"lcc_classes": [int, ...]}')
    return classes


def keep_largest_component(labels: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """Keep only the largest 26-connected component of each class in ``classes`` (in place)."""
    for c in classes:
        if c == 0:
            continue
        box = _bbox(labels == c)
        if box is None:
            continue
        sub = labels[box]
        mask = sub == c
        cc, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
        if n <= 1:
            continue
        sizes = np.bincount(cc.ravel())
        sizes[0] = 0
        sub[mask & (cc != int(sizes.argmax()))] = 0
        logger.debug("class %d: kept the largest of %d components", c, n)
    return labels


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        if not len(hit):
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)
