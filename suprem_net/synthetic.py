"""A small synthetic abdominal CT generator (seeded) for the quick start, tests and benchmarks.

Each case is a body (soft tissue and fat in air) with a spine and up to ten organs placed
as ellipsoids/tubes in patient (LPS) millimetres with per-case jitter, realistic HU values,
Gaussian noise, anisotropic spacing that varies between cases, and NIfTI geometry
(origin, direction) that also varies. Labels follow AbdomenAtlas class names.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from suprem_net.io.atomic import write_json
from suprem_net.io.image import Geometry, write_image

# name, HU, centre (x, y, z) mm in LPS, semi-axes (x, y, z) mm; z semi-axis None = tube over the whole FOV
ORGANS = [
    ("liver", 60, (-60, -10, 60), (70, 60, 55)),
    ("spleen", 50, (75, 40, 60), (30, 35, 40)),
    ("kidney_left", 170, (65, 60, 0), (25, 25, 45)),
    ("kidney_right", 170, (-65, 60, -5), (25, 25, 45)),
    ("aorta", 220, (12, 35, 0), (12, 12, None)),
    ("postcava", 140, (-22, 35, 0), (11, 13, None)),
    ("stomach", 30, (45, -45, 70), (40, 30, 30)),
    ("pancreas", 90, (15, 15, 15), (55, 12, 12)),
    ("gall_bladder", 10, (-55, -60, 20), (18, 18, 25)),
    ("bladder", 5, (0, -30, -100), (40, 35, 25)),
    ("duodenum", 45, (-30, 10, 25), (14, 16, 35)),
    ("liver_tumor", 15, (-75, -25, 65), (16, 16, 16)),  # inside the liver: hypodense lesion
]
ORGAN_NAMES = [o[0] for o in ORGANS]


@dataclass
class SyntheticSpec:
    """What to generate. Structures are drawn in ``ORGANS`` order (a later one covers an earlier one)."""

    num_cases: int = 12
    num_classes: int = 6  # foreground classes, taken from ORGANS in order (when ``classes`` is not given)
    classes: tuple[str, ...] | None = None  # labelled structures by name (label value = position + 1)
    unlabelled: tuple[str, ...] = ()  # structures drawn into the image but not labelled
    fov_mm: tuple[float, float, float] = (250.0, 330.0, 330.0)  # z, y, x
    inplane_spacing: tuple[float, float] = (2.4, 3.2)
    z_spacing: tuple[float, float] = (2.5, 5.0)
    noise_hu: tuple[float, float] = (10.0, 25.0)
    seed: int = 0

    def labelled(self) -> list[str]:
        names = list(self.classes) if self.classes is not None else ORGAN_NAMES[: self.num_classes]
        unknown = sorted((set(names) | set(self.unlabelled)) - set(ORGAN_NAMES))
        if unknown:
            raise ValueError(f"unknown synthetic structures {unknown}; known: {ORGAN_NAMES}")
        return names


def make_case(spec: SyntheticSpec, index: int) -> tuple[np.ndarray, dict[str, np.ndarray], Geometry]:
    """Return ``(ct int16 (z,y,x), {class: bool mask}, geometry)`` for case ``index``."""
    rng = np.random.default_rng([spec.seed, index])
    sxy = rng.uniform(*spec.inplane_spacing)
    sz = rng.uniform(*spec.z_spacing)
    spacing = (sz, sxy, sxy)
    shape = tuple(max(8, int(round(f / s))) for f, s in zip(spec.fov_mm, spacing))
    flip_xy = bool(rng.integers(2))  # half of the cases come in the usual radiological (RAI-like) direction
    direction = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0) if flip_xy else (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
    zz, yy, xx = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing)]
    sign = -1.0 if flip_xy else 1.0
    z, y, x = zz[:, None, None], sign * yy[None, :, None], sign * xx[None, None, :]
    jitter = rng.normal(0, 6, size=3).astype(np.float32)
    x, y, z = x - jitter[0], y - jitter[1], z - jitter[2]
    scale = rng.uniform(0.9, 1.1)

    body_a, body_b = 150 * scale, 105 * scale
    body = (x / body_a) ** 2 + (y / body_b) ** 2 <= 1.0
    body = np.broadcast_to(body, shape)
    ct = np.full(shape, -1000.0, dtype=np.float32)
    ct[body] = -90.0  # fat
    inner = np.broadcast_to((x / (body_a - 18)) ** 2 + (y / (body_b - 18)) ** 2 <= 1.0, shape)
    ct[inner] = 35.0  # muscle / soft tissue
    spine = np.broadcast_to((x / 22) ** 2 + ((y - 80 * scale) / 22) ** 2 <= 1.0, shape)
    ct[spine] = 600.0

    labelled = spec.labelled()
    drawn: dict[str, np.ndarray] = {}
    for name, hu, centre, axes in ORGANS:
        if name not in labelled and name not in spec.unlabelled:
            continue
        c = np.asarray(centre, dtype=np.float32) * scale + rng.normal(0, 4, 3).astype(np.float32)
        ax = np.asarray([a if a is not None else np.inf for a in axes], dtype=np.float32) * rng.uniform(0.85, 1.15)
        d = ((x - c[0]) / ax[0]) ** 2 + ((y - c[1]) / ax[1]) ** 2
        if np.isfinite(ax[2]):
            d = d + ((z - c[2]) / ax[2]) ** 2
        mask = np.broadcast_to(d <= 1.0, shape) & inner
        drawn[name] = mask
        ct[mask] = hu + rng.normal(0, 8)
    masks = {name: drawn[name] for name in labelled}  # in label order
    ct += rng.normal(0, rng.uniform(*spec.noise_hu), size=shape).astype(np.float32)
    origin = tuple(float(v) for v in rng.uniform(-200, 200, 3))
    geo = Geometry(shape=shape, spacing=spacing, origin=origin, direction=direction)
    return np.clip(np.round(ct), -1024, 3071).astype(np.int16), masks, geo


def label_map(masks: dict[str, np.ndarray]) -> np.ndarray:
    """Single-label map: later classes win where masks overlap (class i+1 = i-th mask)."""
    first = next(iter(masks.values()))
    seg = np.zeros(first.shape, dtype=np.uint8)
    for i, m in enumerate(masks.values(), start=1):
        seg[m] = i
    return seg


def write_raw_dataset(root: str | Path, dataset_id: int, spec: SyntheticSpec, num_test: int = 2,
                      name: str = "SynthAbdomen") -> Path:
    """Write an nnU-Net v2 raw dataset ``Dataset{id:03d}_{name}`` with ``spec.num_cases`` training
    cases and ``num_test`` test cases (images and labels in ``imagesTs``/``labelsTs``)."""
    folder = Path(root) / f"Dataset{dataset_id:03d}_{name}"
    names = spec.labelled()
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(spec.num_cases + num_test):
        ct, masks, geo = make_case(spec, i)
        train = i < spec.num_cases
        case = f"case_{i:03d}"
        img_dir, lab_dir = ("imagesTr", "labelsTr") if train else ("imagesTs", "labelsTs")
        write_image(folder / img_dir / f"{case}_0000.nii.gz", ct, geo)
        write_image(folder / lab_dir / f"{case}.nii.gz", label_map(masks), geo)
    write_json(folder / "dataset.json", {
        "name": name,
        "description": f"synthetic abdominal CT generated by suprem_net (seed {spec.seed})",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{n: i for i, n in enumerate(names, start=1)}},
        "numTraining": spec.num_cases,
        "file_ending": ".nii.gz",
    })
    return folder


def write_abdomenatlas(root: str | Path, spec: SyntheticSpec, missing: dict[int, list[str]] | None = None) -> Path:
    """Write cases in the AbdomenAtlas layout ``BDMAP_xxxxxxxx/ct.nii.gz`` +
    ``segmentations/<class>.nii.gz`` (binary masks; they may overlap). ``missing`` maps a
    case index to class names whose mask file is left out (partially labelled cases)."""
    root = Path(root)
    missing = missing or {}
    for i in range(spec.num_cases):
        ct, masks, geo = make_case(spec, i)
        case_dir = root / f"BDMAP_{i + 1:08d}"
        write_image(case_dir / "ct.nii.gz", ct, geo)
        for name, m in masks.items():
            if name not in missing.get(i, []):
                write_image(case_dir / "segmentations" / f"{name}.nii.gz", m.astype(np.uint8), geo)
    return root


def ct_fingerprint(n: int = 40, seed: int = 0) -> dict:
    """The fingerprint of a typical abdominal CT collection, without images: ``n`` cases of 512 x 512
    voxels of 0.7-0.9 mm in-plane and 150-250 slices of 2-3 mm (seeded). For planning tests and
    benchmarks that need a realistic plan but no data."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        sp = [float(rng.uniform(2.0, 3.0)), float(rng.uniform(0.7, 0.9))]
        sh = [int(rng.integers(150, 250)), 512, 512]
        cases.append({"case_id": f"c{i}", "spacing": [sp[0], sp[1], sp[1]], "shape": sh, "shape_after_crop": sh})
    return {"dataset": "Dataset970_CT", "num_cases": n, "cases": cases,
            "foreground_intensity_properties_per_channel": {
                "0": {"mean": 80.0, "std": 60.0, "percentile_00_5": -160.0, "percentile_99_5": 300.0}}}
