"""Seeded k-fold splits, stored once in ``PREPROCESSED/DatasetXXX/splits.json``."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from suprem_net.errors import SupremError
from suprem_net.io.atomic import read_json, write_json

log = logging.getLogger(__name__)

NUM_FOLDS = 5
SPLIT_SEED = 12345


def make_splits(case_ids: list[str], num_folds: int = NUM_FOLDS, seed: int = SPLIT_SEED) -> list[dict]:
    ids = sorted(case_ids)
    k = min(num_folds, len(ids))
    if k < 2:
        raise SupremError(f"need at least 2 cases for a cross-validation split, found {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = np.array_split(order, k)
    return [{"train": sorted(ids[j] for f in range(k) if f != i for j in folds[f]),
             "val": sorted(ids[j] for j in folds[i])} for i in range(k)]


def load_or_create_splits(path: Path, case_ids: list[str]) -> list[dict]:
    if path.is_file():
        return read_json(path)
    splits = make_splits(case_ids)
    write_json(path, splits)
    log.info("created %d-fold split %s", len(splits), path)
    return splits


def fold_cases(splits: list[dict], fold: str, case_ids: list[str]) -> tuple[list[str], list[str]]:
    """(train, val) case ids of ``fold`` (an index or ``all``: train and validate on every case)."""
    if fold == "all":
        return sorted(case_ids), sorted(case_ids)
    try:
        i = int(fold)
    except ValueError:
        raise SupremError(f"fold {fold!r}: give 0..{len(splits) - 1} or all") from None
    if not 0 <= i < len(splits):
        raise SupremError(f"fold {i}: splits.json has folds 0..{len(splits) - 1}")
    train, val = splits[i]["train"], splits[i]["val"]
    unknown = sorted(set(train + val) - set(case_ids))
    if unknown:
        raise SupremError(f"splits.json names cases that are not preprocessed: {', '.join(unknown[:5])} "
                          "(delete splits.json to recreate it)")
    return train, val
