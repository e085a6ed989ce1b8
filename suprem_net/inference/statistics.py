"""Per-class statistics of a predicted case (``suprem_predict --statistics``).

For every class of the model (present or not), inside its mask on the original grid:

* ``voxels`` and ``volume_ml``: voxel count x the voxel volume (product of the spacing, mm^3) / 1000;
* intensity of the image's first channel (HU for CT): ``mean``, ``std`` (population, ddof 0),
  ``median``, ``p5`` and ``p95`` (numpy's linear interpolation between order statistics);
* ``components``: connected components of the mask (cc3d, 26-connectivity: voxels touching by a
  face, an edge or a corner are connected) and ``largest_component_share``: the largest one's
  voxels / the mask's voxels;
* ``bbox_min_mm`` / ``bbox_max_mm``: the axis-aligned box in world coordinates (x, y, z in mm, the
  image's physical space: LPS for DICOM and as SimpleITK reports NIfTI) that holds the centres of
  all the mask's voxels, each centre placed with the geometry's origin, spacing and direction
  (exact for any direction, oblique included).

An empty mask has ``voxels`` 0, ``volume_ml`` 0, ``components`` 0 and null for the rest. With a
multi-label (bitmask) prediction each class uses its own mask, so overlapping voxels count for
every class that holds them. Written per case as JSON (``{"case", "classes": [row, ...]}``) and
CSV (one row per class, bbox as six columns), atomically.
"""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np

from suprem_net.io.atomic import atomic_path, write_json
from suprem_net.io.image import Geometry

logger = logging.getLogger(__name__)

CSV_COLUMNS = ["case", "label", "class", "voxels", "volume_ml", "mean", "std", "median", "p5", "p95", "components",
               "largest_component_share", "bbox_min_x_mm", "bbox_min_y_mm", "bbox_min_z_mm", "bbox_max_x_mm",
               "bbox_max_y_mm", "bbox_max_z_mm"]


def world_bbox(mask: np.ndarray, geometry: Geometry) -> tuple[list[float], list[float]] | None:
    """World (x, y, z) min and max over the centres of ``mask``'s voxels (None if empty).

    The voxel (k, j, i) of a (z, y, x) array lies at ``origin + D @ (i sx, j sy, k sz)``. World
    coordinates are linear in i, so along each row (k, j) the extremes lie at the row's first and
    last mask voxel: only those two per row are placed, which is exact and needs no copy of the mask.
    """
    d = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    scale = d * np.asarray(geometry.spacing[::-1], dtype=float)  # columns: world step per x, y, z index
    k, j = np.nonzero(mask.any(axis=2))
    if k.size == 0:
        return None
    first = mask.argmax(axis=2)[k, j]
    last = mask.shape[2] - 1 - mask[:, :, ::-1].argmax(axis=2)[k, j]
    index = np.concatenate([np.stack([first, j, k], axis=1), np.stack([last, j, k], axis=1)]).astype(float)
    world = index @ scale.T + np.asarray(geometry.origin, dtype=float)
    return [float(v) for v in world.min(0)], [float(v) for v in world.max(0)]


def class_statistics(image: np.ndarray, mask: np.ndarray, geometry: Geometry) -> dict:
    """The statistics of one class (see the module docstring) for a bool ``mask`` on ``image``'s grid."""
    import cc3d

    mask = np.asarray(mask, dtype=bool)
    n = int(np.count_nonzero(mask))
    row: dict = {"voxels": n, "volume_ml": n * float(np.prod(geometry.spacing)) / 1000.0}
    if n == 0:
        row.update(dict.fromkeys(("mean", "std", "median", "p5", "p95"), None), components=0,
                   largest_component_share=None, bbox_min_mm=None, bbox_max_mm=None)
        return row
    values = np.asarray(image)[mask].astype(np.float64)
    p5, median, p95 = np.percentile(values, [5, 50, 95])
    cc, count = cc3d.connected_components(mask.astype(np.uint8), connectivity=26, return_N=True)
    sizes = np.bincount(cc.reshape(-1))[1:]
    lo, hi = world_bbox(mask, geometry)
    row.update(mean=float(values.mean()), std=float(values.std()), median=float(median), p5=float(p5),
               p95=float(p95), components=int(count), largest_component_share=float(sizes.max() / n),
               bbox_min_mm=lo, bbox_max_mm=hi)
    return row


def case_statistics(image: np.ndarray, seg: np.ndarray, geometry: Geometry, class_names: dict[int, str], *,
                    bitmask: bool = False) -> list[dict]:
    """One row per class 1..C: ``label``, ``class`` and :func:`class_statistics`.

    ``seg`` is a label map, or with ``bitmask`` a bitmask (bit c-1 = class c)."""
    rows = []
    for value in sorted(v for v in class_names if v > 0):
        if bitmask:
            mask = (np.asarray(seg).astype(np.uint64) >> np.uint64(value - 1)) & np.uint64(1) == 1
        else:
            mask = seg == value
        rows.append({"label": value, "class": class_names[value], **class_statistics(image, mask, geometry)})
    return rows


def statistics_paths(stem: str | Path, case_folder: bool = False) -> tuple[Path, Path]:
    """``(json, csv)``: ``CASE/statistics.{json,csv}`` for a case folder, else ``STEM_statistics.{json,csv}``."""
    if case_folder:
        return Path(stem) / "statistics.json", Path(stem) / "statistics.csv"
    return Path(f"{stem}_statistics.json"), Path(f"{stem}_statistics.csv")


def write_statistics(json_path: str | Path, csv_path: str | Path, case: str, rows: list[dict]) -> None:
    """``{"case": case, "classes": rows}`` as JSON and the rows as CSV (:data:`CSV_COLUMNS`), atomically."""
    write_json(json_path, {"case": case, "classes": rows})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        lo, hi = r["bbox_min_mm"] or [None] * 3, r["bbox_max_mm"] or [None] * 3
        flat = {**r, "case": case, **{f"bbox_min_{a}_mm": v for a, v in zip("xyz", lo)},
                **{f"bbox_max_{a}_mm": v for a, v in zip("xyz", hi)}}
        writer.writerow(["" if flat[c] is None else flat[c] for c in CSV_COLUMNS])
    with atomic_path(csv_path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
