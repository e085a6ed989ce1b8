"""Preprocess a whole dataset into blosc2: parallel, resumable, shardable.

A case is finished when its properties JSON exists and records the current plan's hash;
the JSON is written after the arrays, each file atomically, so a killed run leaves no
half-written case and a rerun skips what is done.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from suprem_net.errors import SupremError
from suprem_net.io.atomic import read_json, write_json
from suprem_net.io.dataset import Case
from suprem_net.io.image import read_image
from suprem_net.labels import LabelScheme
from suprem_net.preprocessing.case import preprocess_case, sample_bitmask_locations, sample_class_locations
from suprem_net.preprocessing.storage import case_files, save_array
from suprem_net.parallel import map_cases

log = logging.getLogger(__name__)

# plan fields that change the preprocessed data (training settings do not)
_DATA_FIELDS = ("orientation", "target_spacing", "normalization", "resampling", "storage", "patch_size", "num_classes")


def plan_hash(plan: dict) -> str:
    fields = {k: plan[k] for k in _DATA_FIELDS}
    for key in ("label_encoding", "axes"):  # only when set, so that older plans keep their hash
        if plan.get(key):
            fields[key] = plan[key]
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise SupremError(f"--shard {text!r}: expected i/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise SupremError(f"--shard {text!r}: need 0 <= i < N")
    return i, n


def _is_done(props_path: Path, h: str) -> bool:
    if not props_path.is_file():
        return False
    try:
        return read_json(props_path).get("plan_hash") == h
    except Exception:
        return False


def _preprocess_one(args) -> str:
    case, plan, out_dir, h = args[:4]
    annotated = args[4] if len(args) > 4 else None  # class numbers annotated in this case (partial labels)
    images, geos = zip(*(read_image(p, dtype=np.float32) for p in case.images))
    label = read_image(case.label, dtype=None)[0] if case.label is not None else None
    scheme = LabelScheme.of(plan)
    if label is not None:
        label = label.astype(scheme.storage_dtype)
    data, seg, props = preprocess_case(list(images), geos[0], plan, label)
    files = case_files(out_dir, case.case_id)
    patch = plan["patch_size"]
    st = plan["storage"]
    save_array(files["image"], data.astype(st["dtype"]), patch, st["codec"], st["clevel"])
    if seg is not None:
        save_array(files["seg"], seg[None], patch, st["codec"], st["clevel"])
        props["class_locations"] = (sample_bitmask_locations(seg, plan["num_classes"]) if scheme.multi_label
                                    else sample_class_locations(seg, plan["num_classes"]))
        if annotated is not None:
            props["annotated_classes"] = annotated
        props["raw_label"] = str(case.label)
    props.update({"case_id": case.case_id, "plan_hash": h, "raw_images": [str(p) for p in case.images]})
    write_json(files["properties"], props)
    return case.case_id


def annotated_per_case(plan: dict, partial_labels: dict | None) -> dict[str, list[int]] | None:
    """Annotated class numbers of the cases listed in ``partial_labels``, or None when nothing is to be
    recorded. Multi-label plans always record ``annotated_classes``; single-label plans only when the
    dataset has partial labels. Cases not listed annotate every class (:func:`_annotated`)."""
    scheme = LabelScheme.of(plan)
    if not partial_labels and not scheme.multi_label:
        return None
    return {case: scheme.annotated(missing) for case, missing in (partial_labels or {}).items()}


def _annotated(table: dict[str, list[int]] | None, plan: dict, case_id: str) -> list[int] | None:
    if table is None:
        return None
    return table.get(case_id, LabelScheme.of(plan).annotated(None))


def preprocess_dataset(cases: list[Case], plan: dict, out_dir: Path, num_workers: int = 2,
                       shard: tuple[int, int] = (0, 1), partial_labels: dict | None = None) -> dict:
    """Preprocess the cases of ``shard`` that are not finished yet. Returns counts.

    ``partial_labels`` (dataset.json): {case: [class names not annotated]}; see :func:`annotated_per_case`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    h = plan_hash(plan)
    i, n = shard
    mine = cases[i::n]
    todo = [c for c in mine if not _is_done(case_files(out_dir, c.case_id)["properties"], h)]
    log.info("preprocessing %d of %d cases (%d already done) into %s", len(todo), len(mine), len(mine) - len(todo),
             out_dir)
    table = annotated_per_case(plan, partial_labels)
    map_cases(_preprocess_one, [(c, plan, out_dir, h, _annotated(table, plan, c.case_id)) for c in todo], num_workers,
         "preprocess")
    return {"cases": len(mine), "preprocessed": len(todo), "skipped": len(mine) - len(todo)}


def verify_complete(cases: list[Case], plan: dict, out_dir: Path) -> list[str]:
    """Case ids not (or not correctly) preprocessed under ``plan``: the merge check after sharded runs."""
    h = plan_hash(plan)
    return [c.case_id for c in cases if not _is_done(case_files(out_dir, c.case_id)["properties"], h)
            or not case_files(out_dir, c.case_id)["image"].is_file()]
