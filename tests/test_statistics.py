"""Organ statistics (suprem_predict --statistics) on hand-built volumes whose answers are worked out by hand."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from suprem_net.inference.statistics import CSV_COLUMNS, case_statistics, class_statistics, world_bbox, \
    write_statistics
from suprem_net.io.image import Geometry

IDENTITY = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
SHAPE, SPACING, ORIGIN = (4, 5, 6), (2.0, 1.0, 0.5), (10.0, 20.0, 30.0)  # spacing (z, y, x); origin (x, y, z)


def _case() -> tuple[np.ndarray, np.ndarray]:
    """A 2x2x2 cube holding 0..7, a voxel touching its corner (100) and a separate voxel (-50)."""
    image = np.full(SHAPE, 999.0, np.float32)  # outside the mask: must not count
    mask = np.zeros(SHAPE, bool)
    mask[0:2, 0:2, 0:2] = True
    image[0:2, 0:2, 0:2] = np.arange(8).reshape(2, 2, 2)
    mask[2, 2, 2], image[2, 2, 2] = True, 100  # corner contact with (1, 1, 1): 26-connected, not 6-connected
    mask[3, 4, 5], image[3, 4, 5] = True, -50
    return image, mask


def test_volume_intensity_and_components():
    image, mask = _case()
    row = class_statistics(image, mask, Geometry(SHAPE, SPACING, ORIGIN, IDENTITY))
    assert row["voxels"] == 10
    assert row["volume_ml"] == pytest.approx(10 * 2.0 * 1.0 * 0.5 / 1000)  # 10 voxels of 1 mm^3
    # values -50, 0..7, 100: sum 78
    assert row["mean"] == pytest.approx(7.8)
    assert row["std"] == pytest.approx(math.sqrt((140 + 100 ** 2 + 50 ** 2) / 10 - 7.8 ** 2))  # population std
    assert row["median"] == pytest.approx(3.5)
    assert row["p5"] == pytest.approx(-50 + 0.45 * 50)  # rank 0.05 * 9 = 0.45 between -50 and 0
    assert row["p95"] == pytest.approx(7 + 0.55 * 93)  # rank 8.55 between 7 and 100
    assert row["components"] == 2  # the corner-touching voxel joins the cube (26-connectivity)
    assert row["largest_component_share"] == pytest.approx(0.9)


def test_world_bbox_identity_and_rotated_directions():
    _, mask = _case()  # voxel indices: x (i) 0..5, y (j) 0..4, z (k) 0..3
    lo, hi = world_bbox(mask, Geometry(SHAPE, SPACING, ORIGIN, IDENTITY))
    assert lo == pytest.approx([10.0, 20.0, 30.0]) and hi == pytest.approx([10 + 5 * 0.5, 20 + 4 * 1.0, 30 + 3 * 2.0])
    # x index runs along world +y, y index along world -x: world = (10 - j, 20 + 0.5 i, 30 + 2 k)
    rotated = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    lo, hi = world_bbox(mask, Geometry(SHAPE, SPACING, ORIGIN, rotated))
    assert lo == pytest.approx([6.0, 20.0, 30.0]) and hi == pytest.approx([10.0, 22.5, 36.0])


def test_world_bbox_is_exact_for_an_oblique_direction():
    c = s = math.sqrt(0.5)  # 45 degrees about z: world = (c i - s j, s i + c j, k)
    geo = Geometry((1, 4, 5), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    mask = np.zeros(geo.shape, bool)
    mask[0, 0, 0] = mask[0, 2, 4] = mask[0, 3, 0] = True  # (i, j) = (0, 0), (4, 2), (0, 3)
    lo, hi = world_bbox(mask, geo)
    # centres: (0, 0), (4c - 2s, 4s + 2c) = (sqrt 2, 3 sqrt 2), (-3s, 3c); the index box's corner (4, 3)
    # would reach y = 7/sqrt 2, which no voxel does
    assert lo == pytest.approx([-3 * s, 0.0, 0.0]) and hi == pytest.approx([math.sqrt(2), 3 * math.sqrt(2), 0.0])


def test_rows_per_class_empty_class_and_overlapping_bitmask(tmp_path):
    image, mask = _case()
    geo = Geometry(SHAPE, SPACING, ORIGIN, IDENTITY)
    seg = mask.astype(np.uint8)  # class 1; class 2 absent
    rows = case_statistics(image, seg, geo, {0: "background", 1: "liver", 2: "spleen"})
    assert [(r["label"], r["class"], r["voxels"]) for r in rows] == [(1, "liver", 10), (2, "spleen", 0)]
    assert rows[1]["components"] == 0 and rows[1]["mean"] is None and rows[1]["bbox_min_mm"] is None
    other = np.zeros(SHAPE, bool)
    other[0:2, 0:2, 0:2] = True  # overlaps the cube: counts for both classes
    bits = (mask * 1 + other * 2).astype(np.uint8)
    rows = case_statistics(image, bits, geo, {1: "liver", 2: "liver_tumor"}, bitmask=True)
    assert [r["voxels"] for r in rows] == [10, 8] and rows[1]["mean"] == pytest.approx(3.5)

    write_statistics(tmp_path / "c.json", tmp_path / "c.csv", "case_1", rows)
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["case"] == "case_1" and data["classes"][0]["bbox_max_mm"] == pytest.approx([12.5, 24.0, 36.0])
    with open(tmp_path / "c.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == CSV_COLUMNS and [r["class"] for r in table] == ["liver", "liver_tumor"]
    assert float(table[0]["volume_ml"]) == pytest.approx(0.01) and table[0]["bbox_max_x_mm"] == "12.5"
    assert table[1]["components"] == "1" and float(table[1]["largest_component_share"]) == 1.0
