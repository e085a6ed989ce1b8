"""Evaluate a folder of predicted label maps against a folder of reference label maps.

Cases are matched by file name (same name in both folders; any ending of
:data:`suprem_net.io.image.IMAGE_ENDINGS`). Per case and class we compute DSC and NSD
(:mod:`suprem_net.evaluation.metrics`); per class the means over cases (``np.nanmean``, so
cases where reference and prediction are both empty are left out) and the foreground mean
(the mean of the per-class means). See docs/evaluation.md for the output format.
"""
from __future__ import annotations

import csv
import logging
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from suprem_net.errors import InputError, SupremError
from suprem_net.evaluation.metrics import dice, normalized_surface_dice, union_slices
from suprem_net.io.atomic import atomic_path, read_json, write_json
from suprem_net.io.image import IMAGE_ENDINGS, read_header, read_image, strip_ending

logger = logging.getLogger(__name__)

METRICS = ("dsc", "nsd")
CSV_FIELDS = ("case", "class", "label", "dsc", "nsd", "n_ref", "n_pred")


# ----------------------------------------------------------------------------- inputs
def list_cases(folder: str | os.PathLike) -> dict[str, Path]:
    """Image files directly in ``folder`` by file name (hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "folder not found")
    return {p.name: p for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.name.endswith(IMAGE_ENDINGS)}


def match_cases(ref_dir: str | os.PathLike, pred_dir: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """``(case name, reference file, prediction file)`` for every reference file.

    A prediction with exactly the reference's file name is used; failing that, the only
    prediction with the same name before the ending (``case.nii`` for ``case.nii.gz``).
    A reference without a prediction is an :class:`InputError` naming the missing file.
    """
    refs, preds = list_cases(ref_dir), list_cases(pred_dir)
    if not refs:
        raise InputError(ref_dir, f"no reference images ({', '.join(IMAGE_ENDINGS)})")
    by_stem: dict[str, list[Path]] = {}
    for p in preds.values():
        by_stem.setdefault(strip_ending(p.name), []).append(p)
    pairs, used = [], set()
    for name, ref in refs.items():
        pred = preds.get(name)
        if pred is None:
            candidates = by_stem.get(strip_ending(name), [])
            if len(candidates) == 1:
                pred = candidates[0]
            else:
                raise InputError(Path(pred_dir) / name, f"prediction missing for reference case {ref}")
        used.add(pred.name)
        pairs.append((strip_ending(name), ref, pred))
    extra = sorted(set(preds) - used)
    if extra:
        logger.warning("%d prediction(s) without a reference are ignored (e.g. %s)", len(extra), extra[0])
    return pairs


def parse_labels(values: list[str] | None) -> dict[str, int] | None:
    """Labels from ``-l``: integers (``1 2 3``) or one dataset.json path (name -> int)."""
    if not values:
        return None
    if len(values) == 1 and values[0].endswith(".json"):
        spec = read_json(values[0])
        table = spec.get("labels", spec) if isinstance(spec, dict) else None
        if not isinstance(table, dict):
            raise InputError(values[0], "expected a 'labels' object mapping names to integers")
        labels = {}
        for name, value in table.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(values[0], f"label {name!r} is {value!r}; only integer labels are supported "
                                            f"(region-based labels are not)")
            if value != 0:
                labels[str(name)] = value
    else:
        labels = {}
        for v in values:
            try:
                labels[v] = int(v)
            except ValueError:
                raise SupremError(f"-l: {v!r} is neither an integer label nor a .json file") from None
    bad = [f"{k}={v}" for k, v in labels.items() if v <= 0]
    if bad:
        raise SupremError(f"labels must be positive integers (0 is background): {', '.join(bad)}")
    if not labels:
        raise SupremError("no foreground labels given")
    return labels


def check_headers(pairs: list[tuple[str, Path, Path]]) -> None:
    """Fail fast (before any voxel is read) on unreadable/2D files and geometry mismatches."""
    for _, ref, pred in pairs:
        ref_geo, _ = read_header(ref)
        pred_geo, _ = read_header(pred)
        problem = ref_geo.mismatch(pred_geo)
        if problem:
            raise InputError(pred, f"geometry differs from reference {ref}: {problem}")


def read_label_map(path: Path) -> tuple[np.ndarray, tuple[float, ...], object]:
    arr, geo = read_image(path, dtype=None)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    elif not np.issubdtype(arr.dtype, np.integer):
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            raise InputError(path, "label map has non-integer values")
        arr = rounded.astype(np.int32)
    return arr, geo.spacing, geo


# ----------------------------------------------------------------------------- per case
def _present(objects: list) -> set[int]:
    return {i + 1 for i, s in enumerate(objects) if s is not None}


def evaluate_case(ref_path: Path, pred_path: Path, labels: list[int] | None,
                  tolerance_mm: float = 1.0) -> dict:
    """DSC/NSD of one case for ``labels`` (None: every positive value in reference or prediction).

    Returns ``{"ref_labels": [...], "metrics": {label: {dsc, nsd, n_ref, n_pred}}}``.
    """
    ref, spacing, ref_geo = read_label_map(ref_path)
    pred, _, pred_geo = read_label_map(pred_path)
    problem = ref_geo.mismatch(pred_geo)
    if problem:
        raise InputError(pred_path, f"geometry differs from reference {ref_path}: {problem}")
    top = max(labels) if labels else max(int(ref.max()), int(pred.max()), 0)
    # one pass per volume gives every label's bounding box
    ref_obj = ndimage.find_objects(ref, max_label=top) if top > 0 else []
    pred_obj = ndimage.find_objects(pred, max_label=top) if top > 0 else []
    ref_labels = sorted(_present(ref_obj))
    todo = labels if labels is not None else sorted(_present(ref_obj) | _present(pred_obj))
    metrics = {}
    for lab in todo:
        box = union_slices(ref_obj[lab - 1], pred_obj[lab - 1], ref.shape, margin=1)
        if box is None:
            metrics[lab] = {"dsc": math.nan, "nsd": math.nan, "n_ref": 0, "n_pred": 0}
            continue
        r, p = ref[box] == lab, pred[box] == lab
        metrics[lab] = {
            "dsc": dice(p, r),
            "nsd": normalized_surface_dice(p, r, spacing, tolerance_mm),
            "n_ref": int(np.count_nonzero(r)),
            "n_pred": int(np.count_nonzero(p)),
        }
    return {"ref_labels": ref_labels, "metrics": metrics}


def _worker(args) -> dict:
    """Pool entry point. User errors come back as text: InputError does not unpickle."""
    try:
        return evaluate_case(*args)
    except SupremError as e:
        return {"error": str(e)}


# ----------------------------------------------------------------------------- folders
def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0 or np.all(np.isnan(arr)):
        return math.nan
    return float(np.nanmean(arr))


def evaluate_folders(ref_dir: str | os.PathLike, pred_dir: str | os.PathLike,
                     labels: dict[str, int] | None = None, tolerance_mm: float = 1.0,
                     num_workers: int = 2) -> dict:
    """Per-case per-class DSC/NSD, per-class means over cases, and the foreground mean.

    ``labels`` maps class names to label values; None means every positive value found in
    the references (values only found in predictions are reported in the log, not scored).
    """
    if not np.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise SupremError(f"tolerance must be a finite number >= 0 mm, got {tolerance_mm}")
    pairs = match_cases(ref_dir, pred_dir)
    check_headers(pairs)
    wanted = sorted(set(labels.values())) if labels is not None else None
    jobs = [(ref, pred, wanted, tolerance_mm) for _, ref, pred in pairs]
    workers = max(1, min(int(num_workers), len(jobs)))
    logger.info("evaluating %d case(s) with %d worker(s), tolerance %g mm", len(jobs), workers, tolerance_mm)
    bar = dict(total=len(jobs), desc="evaluate", unit="case", disable=None)
    if workers == 1:
        results = [_worker(j) for j in tqdm(jobs, **bar)]
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(tqdm(pool.map(_worker, jobs), **bar))
    for r in results:
        if "error" in r:
            raise SupremError(r["error"])

    if labels is None:
        found = sorted(set().union(*(r["ref_labels"] for r in results)))
        pred_only = sorted(set().union(*(r["metrics"] for r in results)) - set(found))
        if pred_only:
            logger.warning("label(s) %s occur only in predictions and are not scored (pass -l to score them)",
                           pred_only)
        if not found:
            raise SupremError(f"the references in {ref_dir} contain no foreground label; pass the labels with -l")
        labels = {str(v): v for v in found}

    empty = {"dsc": math.nan, "nsd": math.nan, "n_ref": 0, "n_pred": 0}
    cases = []
    for (name, ref, pred), r in zip(pairs, results):
        per_class = {cls: dict(r["metrics"].get(v, empty)) for cls, v in labels.items()}
        cases.append({"case": name, "reference": str(ref), "prediction": str(pred), "metrics": per_class})

    mean = {}
    for cls in labels:
        entry = {m: _nanmean([c["metrics"][cls][m] for c in cases]) for m in METRICS}
        entry["n_cases"] = int(sum(not math.isnan(c["metrics"][cls]["dsc"]) for c in cases))
        mean[cls] = entry
    foreground = {m: _nanmean([mean[cls][m] for cls in labels]) for m in METRICS}
    return {
        "reference_folder": str(ref_dir),
        "prediction_folder": str(pred_dir),
        "tolerance_mm": float(tolerance_mm),
        "labels": dict(labels),
        "conventions": {
            "both_empty": "NaN (left out of means)",
            "one_empty": 0.0,
            "surface": "mask XOR erosion with the 6-neighbourhood; image border counts as surface",
        },
        "mean": mean,
        "foreground_mean": foreground,
        "cases": cases,
    }


# ----------------------------------------------------------------------------- output
def _json_safe(obj):
    """NaN -> null: strict JSON has no NaN."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return str(v)


def summary_rows(summary: dict) -> list[dict]:
    """CSV rows: one per case and class, then one ``mean`` row per class and the foreground mean."""
    labels = summary["labels"]
    rows = []
    for case in summary["cases"]:
        for cls, m in case["metrics"].items():
            rows.append({"case": case["case"], "class": cls, "label": labels[cls], **m})
    for cls, m in summary["mean"].items():
        rows.append({"case": "mean", "class": cls, "label": labels[cls], "dsc": m["dsc"], "nsd": m["nsd"],
                     "n_ref": "", "n_pred": ""})
    fg = summary["foreground_mean"]
    rows.append({"case": "mean", "class": "foreground", "label": "", "dsc": fg["dsc"], "nsd": fg["nsd"],
                 "n_ref": "", "n_pred": ""})
    return rows


def write_summary(summary: dict, out_json: str | os.PathLike, out_csv: str | os.PathLike | None = None) -> None:
    """Write ``summary`` as JSON (NaN as null) and as CSV (NaN as ``nan``), each atomically."""
    rows = summary_rows(summary)
    if out_csv is not None:
        with atomic_path(out_csv) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
                writer.writeheader()
                for row in rows:
                    writer.writerow({k: _fmt(row[k]) for k in CSV_FIELDS})
    write_json(out_json, _json_safe(summary))
