"""Dataset fingerprint: per-case geometry, crop sizes, class volumes; foreground intensity statistics.

Deterministic: every case samples its foreground intensities with its own seed, and the
dataset statistics are computed over the samples concatenated in case order. Memory stays
bounded whatever the number of cases: at most ``MAX_TOTAL_SAMPLES`` intensities are kept.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from suprem_net.io.dataset import Case, RawDataset
from suprem_net.io.atomic import read_json, write_json
from suprem_net.io.image import read_image
from suprem_net.labels import LabelScheme, class_counts
from suprem_net.parallel import map_cases
from suprem_net.preprocessing.case import nonzero_bbox
from suprem_net.planning.verify import IntegrityError, voxel_problems

log = logging.getLogger(__name__)
MAX_TOTAL_SAMPLES = 10_000_000
FINGERPRINT_VERSION = 1


def _analyze_case(args) -> dict:
    case, index, n_samples, allowed, labels = args[:5]
    n_bits = args[5] if len(args) > 5 else None  # bitmask (multi-label) datasets: number of classes
    images, geos = zip(*(read_image(p, dtype=None) for p in case.images))
    label, _ = read_image(case.label, dtype=None)
    problems = voxel_problems(case.case_id, case.images, images, case.label, label, allowed, n_bits)
    out = {"case_id": case.case_id, "problems": problems}
    if problems:
        return out
    geo = geos[0]
    data = np.stack([im.astype(np.float32) for im in images])
    bbox = nonzero_bbox(data)
    voxel_ml = float(np.prod(geo.spacing)) / 1000.0
    if n_bits is not None:  # voxels per class bit; a voxel may count for several classes
        label = label.astype(np.int64)
        counts = np.array([0] + class_counts(label, n_bits))
    else:
        label = label.astype(np.int16)
        counts = np.bincount(label.reshape(-1), minlength=max(labels.values()) + 1)
    fg = label > 0
    rng = np.random.default_rng([1234, index])
    samples = []
    for c in range(data.shape[0]):
        vals = data[c][fg]
        samples.append(rng.choice(vals, n_samples, replace=True) if len(vals) else np.zeros(0, np.float32))
    out.update({
        "spacing": list(geo.spacing),
        "shape": list(geo.shape),
        "shape_after_crop": [hi - lo for lo, hi in bbox],
        "pixel_type": str(images[0].dtype),
        "class_voxels": {name: int(counts[v]) for name, v in labels.items() if v > 0},
        "class_volume_ml": {name: round(int(counts[v]) * voxel_ml, 3) for name, v in labels.items() if v > 0},
        "_samples": samples,
    })
    return out


def _stats(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {k: 0.0 for k in ("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5")}
    v = values.astype(np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)),
            "min": float(v.min()), "max": float(v.max()),
            "percentile_00_5": float(np.percentile(v, 0.5)), "percentile_99_5": float(np.percentile(v, 99.5))}


def compute_fingerprint(ds: RawDataset, cases: list[Case], num_workers: int = 2) -> dict:
    """Read every training case once; raise IntegrityError listing all voxel-level problems."""
    n_samples = max(1, MAX_TOTAL_SAMPLES // max(1, len(cases)))
    allowed = set(ds.labels.values())
    scheme = LabelScheme.of(ds.spec)
    n_bits = scheme.num_classes if scheme.multi_label else None
    jobs = [(c, i, n_samples, allowed, ds.labels, n_bits) for i, c in enumerate(cases)]
    results = map_cases(_analyze_case, jobs, num_workers, "fingerprint")
    problems = [p for r in results for p in r["problems"]]
    if problems:
        raise IntegrityError(problems)
    n_channels = len(ds.channel_names)
    intensity = {}
    for c in range(n_channels):
        intensity[str(c)] = _stats(np.concatenate([r["_samples"][c] for r in results]))
    per_case = [{k: v for k, v in r.items() if not k.startswith("_") and k != "problems"} for r in results]
    fg_total = {name: sum(r["class_voxels"][name] for r in per_case) for name in ds.labels if name != "background"}
    empty = [name for name, n in fg_total.items() if n == 0]
    if len(empty) == len(fg_total):
        raise IntegrityError([f"{ds.root / 'labelsTr'}: no foreground voxels in any label file"])
    for name in empty:
        log.warning("class %r has no voxels in any training case", name)
    return {
        "fingerprint_version": FINGERPRINT_VERSION,
        "dataset": ds.name,
        "num_cases": len(per_case),
        "cases": per_case,
        "foreground_intensity_properties_per_channel": intensity,
        "median_spacing": np.median([r["spacing"] for r in per_case], axis=0).tolist(),
        "median_shape": np.median([r["shape"] for r in per_case], axis=0).tolist(),
        "median_relative_size_after_cropping": float(np.median(
            [np.prod(r["shape_after_crop"]) / np.prod(r["shape"]) for r in per_case])),
        "empty_classes": empty,
    }


def load_or_compute(path: Path, ds: RawDataset, cases: list[Case], num_workers: int, force: bool) -> dict:
    if path.is_file() and not force:
        fp = read_json(path)
        if fp.get("fingerprint_version") == FINGERPRINT_VERSION and \
                [c["case_id"] for c in fp["cases"]] == [c.case_id for c in cases]:
            log.info("fingerprint: reusing %s", path)
            return fp
    fp = compute_fingerprint(ds, cases, num_workers)
    write_json(path, fp)
    return fp
