"""Final validation of a fold: sliding-window prediction of its validation cases in their
original geometry, then DSC and NSD per class into ``fold_F/validation/summary.json``."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from suprem_net.evaluation.metrics import dice, normalized_surface_dice
from suprem_net.inference.inputs import Case, read_case
from suprem_net.inference.multilabel import predict_multilabel
from suprem_net.inference.predictor import Predictor
from suprem_net.io.atomic import write_json
from suprem_net.io.image import read_image, write_image
from suprem_net.labels import LabelScheme, channel

log = logging.getLogger(__name__)


def _nanmean(values) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else None


def _clean(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def _predict_bitmask(predictor, image_paths) -> tuple[np.ndarray, object]:
    paths = [Path(p) for p in image_paths]
    images, geometry = read_case(Case(name=paths[0].name, files=paths))
    return predict_multilabel(predictor, images, geometry)[1], geometry


def validate_fold(plan: dict, model, store, case_ids: list[str], out_dir: Path, device,
                  tolerance_mm: float = 1.0) -> dict:
    """Predict every case of ``case_ids`` from its raw images and score it against its raw label."""
    model.eval()
    predictor = Predictor.from_model(plan, model, device=device, tta=False)
    labels = {name: int(v) for name, v in plan["labels"].items() if int(v) != 0}
    multi = LabelScheme.of(plan).multi_label  # multi-label: score every class's own mask
    cases = []
    for case_id in case_ids:
        props = store.properties(case_id)
        if multi:
            seg, geometry = _predict_bitmask(predictor, props["raw_images"])
        else:
            seg, geometry = predictor.predict_files(props["raw_images"])
            seg = seg.astype(np.uint8)
        write_image(out_dir / f"{case_id}{plan.get('file_ending', '.nii.gz')}", seg, geometry)
        ref, ref_geo = read_image(props["raw_label"], dtype=None)
        if ref.shape != seg.shape:
            raise RuntimeError(f"{case_id}: prediction {seg.shape} vs reference {ref.shape}")
        row = {"case_id": case_id, "dice": {}, "nsd": {}}
        annotated = props.get("annotated_classes")
        for name, v in labels.items():
            if annotated is not None and v not in annotated:  # partial labels: nothing to score against
                row["dice"][name] = row["nsd"][name] = None
                continue
            p, r = (channel(seg, v), channel(ref, v)) if multi else (seg == v, ref == v)
            row["dice"][name] = _clean(dice(p, r))
            row["nsd"][name] = _clean(normalized_surface_dice(p, r, ref_geo.spacing, tolerance_mm=tolerance_mm))
        cases.append(row)
        log.info("validation %s: mean Dice %.4f", case_id, _nanmean(row["dice"].values()) or 0.0)
    mean = {"dice": {n: _nanmean(c["dice"][n] for c in cases) for n in labels},
            "nsd": {n: _nanmean(c["nsd"][n] for c in cases) for n in labels}}
    summary = {"nsd_tolerance_mm": tolerance_mm, "cases": cases, "mean": mean,
               "foreground_mean": {"dice": _nanmean(mean["dice"].values()), "nsd": _nanmean(mean["nsd"].values())}}
    write_json(out_dir / "summary.json", summary)
    log.info("validation: mean Dice %s, mean NSD %s -> %s", summary["foreground_mean"]["dice"],
             summary["foreground_mean"]["nsd"], out_dir / "summary.json")
    return summary
