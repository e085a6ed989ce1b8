"""Access to preprocessed cases in blosc2: properties, shapes and region reads.

Arrays are opened lazily in the process that reads them (blosc2 handles are not shared
across the fork of a loader worker) and only the requested region is decompressed.
Properties (with their ``class_locations``, about 3 MiB of Python objects per case with 25
classes) and open arrays are kept for the ``CACHED_CASES`` most recently used cases only, so a
process's memory does not grow with the number of cases it has drawn from.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np

from suprem_net.errors import SupremError
from suprem_net.io.atomic import read_json
from suprem_net.preprocessing.storage import case_files, finished_cases, open_array

log = logging.getLogger(__name__)
CACHED_CASES = 32  # per process: properties and open blosc2 handles of the most recently used cases


def _cached(cache: OrderedDict, key, make):
    """LRU lookup: ``cache[key]``, made with ``make()`` when absent; at most ``CACHED_CASES`` entries."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = cache[key] = make()
    while len(cache) > CACHED_CASES:
        cache.popitem(last=False)
    return value


class CaseStore:
    """The preprocessed cases of one plan (``PREPROCESSED/DatasetXXX/<data_identifier>``)."""

    def __init__(self, folder: str | Path, case_ids: list[str] | None = None):
        self.folder = Path(folder)
        available = finished_cases(self.folder)
        if not available:
            raise SupremError(f"{self.folder}: no preprocessed cases (run suprem_plan_and_preprocess first)")
        if case_ids is None:
            case_ids = available
        missing = sorted(set(case_ids) - set(available))
        if missing:
            raise SupremError(f"{self.folder}: {len(missing)} cases are not preprocessed: {', '.join(missing[:5])}")
        self.case_ids = list(case_ids)
        self._props: OrderedDict[str, dict] = OrderedDict()
        self._arrays: OrderedDict[str, tuple] = OrderedDict()

    def __getstate__(self):  # open handles stay in the process that made them
        state = dict(self.__dict__)
        state["_arrays"] = OrderedDict()
        return state

    def properties(self, case_id: str) -> dict:
        return _cached(self._props, case_id,
                       lambda: read_json(case_files(self.folder, case_id)["properties"]))

    def _open(self, case_id: str):
        def make():
            files = case_files(self.folder, case_id)
            if not files["seg"].is_file():
                raise SupremError(f"{files['seg']}: missing (case {case_id} has no label)")
            return open_array(files["image"]), open_array(files["seg"])

        return _cached(self._arrays, case_id, make)

    def shape(self, case_id: str) -> tuple[int, int, int]:
        return tuple(int(s) for s in self._open(case_id)[0].shape[1:])

    def num_channels(self) -> int:
        return int(self._open(self.case_ids[0])[0].shape[0])

    def read(self, case_id: str, lo, size) -> tuple[np.ndarray, np.ndarray]:
        """Region ``[lo, lo + size)`` (Z, Y, X, may extend past the volume) as float32 image (C, ...)
        and uint8/16 labels (1, ...); outside the volume the image is 0 and the label background."""
        image, seg = self._open(case_id)
        shape = image.shape[1:]
        lo = [int(v) for v in lo]
        hi = [a + int(s) for a, s in zip(lo, size)]
        clo = [max(0, a) for a in lo]
        chi = [min(s, b) for s, b in zip(shape, hi)]
        out_img = np.zeros((image.shape[0], *size), dtype=np.float32)
        out_seg = np.zeros((1, *size), dtype=seg.dtype)
        if all(b > a for a, b in zip(clo, chi)):
            src = (slice(None),) + tuple(slice(a, b) for a, b in zip(clo, chi))
            dst = (slice(None),) + tuple(slice(a - l, b - l) for a, b, l in zip(clo, chi, lo))
            out_img[dst] = image[src]
            out_seg[dst] = seg[src]
        return out_img, out_seg

    def read_full(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        image, seg = self._open(case_id)
        return np.asarray(image[...], dtype=np.float32), np.asarray(seg[...])
