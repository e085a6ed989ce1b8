"""Convert the AbdomenAtlas layout into an nnU-Net v2 raw dataset.

Input: ``ROOT/BDMAP_xxxxxxxx/ct.nii.gz`` + ``ROOT/BDMAP_xxxxxxxx/segmentations/<class>.nii.gz``
(one binary mask per class; masks may overlap). Output: ``DatasetNNN_Name/`` with the CT
copied byte for byte to ``imagesTr/CASE_0000.nii.gz`` and one label map per case.

Overlap rule: a voxel claimed by several masks gets the class whose mask is the smallest
in that case, so thin or nested structures (vessels in organs, tumours in organs) survive
instead of being painted over by the organ that contains them. Classes are numbered in
the AbdomenAtlas 1.1 order; names not in it follow alphabetically. Cases that lack some
mask files are listed in ``dataset.json["partial_labels"]`` (class names missing per case).

``multi_label=True`` (``--multi-label``) keeps every class as its own channel instead: the label
map is a bitmask (bit c-1 set where class c's mask is 1; see docs/multilabel.md) and dataset.json
gets ``"label_encoding": "bitmask"``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from suprem_net.errors import InputError, SupremError
from suprem_net.io.atomic import atomic_path, read_json, write_json
from suprem_net.io.image import read_header, read_image, write_image
from suprem_net import labels as label_format
from suprem_net.labels import ABDOMENATLAS_25, LabelScheme
from suprem_net.parallel import map_cases


def _mask_name(p: Path) -> str:
    return p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.stem


def scan(root: Path) -> tuple[list[Path], list[str]]:
    """Case folders and the ordered class names found under ``root``."""
    if not root.is_dir():
        raise InputError(root, "folder not found")
    cases = sorted(p for p in root.iterdir() if p.is_dir() and (p / "ct.nii.gz").is_file())
    if not cases:
        raise InputError(root, "no case folders with ct.nii.gz found (expected ROOT/CASE/ct.nii.gz)")
    names = set()
    for c in cases:
        seg_dir = c / "segmentations"
        if not seg_dir.is_dir():
            raise InputError(seg_dir, "folder not found")
        names.update(_mask_name(p) for p in seg_dir.iterdir() if p.name.endswith((".nii.gz", ".nii")))
    if not names:
        raise InputError(root, "no mask files in any CASE/segmentations/")
    ordered = [n for n in ABDOMENATLAS_25 if n in names] + sorted(names - set(ABDOMENATLAS_25))
    return cases, ordered


def _convert_case(args) -> tuple[str, list[str]]:
    case_dir, classes, out, multi_label = args
    case = case_dir.name
    label_path = out / "labelsTr" / f"{case}.nii.gz"
    image_path = out / "imagesTr" / f"{case}_0000.nii.gz"
    ct_geo, _ = read_header(case_dir / "ct.nii.gz")
    masks, missing = {}, []
    for value, name in enumerate(classes, start=1):
        f = case_dir / "segmentations" / f"{name}.nii.gz"
        if not f.is_file():
            missing.append(name)
            continue
        m, geo = read_image(f, dtype=None)
        diff = ct_geo.mismatch(geo)
        if diff:
            raise InputError(f, f"geometry differs from ct.nii.gz: {diff}")
        masks[value] = m > 0
    if label_path.is_file() and image_path.is_file():
        return case, missing
    if multi_label:
        seg = label_format.encode(masks, ct_geo.shape, len(classes))
    else:
        seg = np.zeros(ct_geo.shape, dtype=np.uint8 if len(classes) < 256 else np.uint16)
        # paint the largest masks first so that smaller (nested) structures win overlaps
        for value in sorted(masks, key=lambda v: -int(masks[v].sum())):
            seg[masks[value]] = value
    with atomic_path(image_path) as tmp:
        shutil.copyfile(case_dir / "ct.nii.gz", tmp)
    write_image(label_path, seg, ct_geo)  # written last: marks the case as converted
    return case, missing


def convert(root: str | Path, raw_root: str | Path, dataset_id: int, name: str = "AbdomenAtlas",
            num_workers: int = 2, multi_label: bool = False) -> Path:
    root = Path(root)
    cases, classes = scan(root)
    if multi_label:
        label_format.bitmask_dtype(len(classes))  # more than 32 classes -> SupremError
    out = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    existing = [p for p in Path(raw_root).glob(f"Dataset{dataset_id:03d}_*") if p != out]
    if existing:
        raise SupremError(f"dataset id {dataset_id} is already used by {existing[0]}")
    previous = out / "dataset.json"
    if previous.is_file():  # a rerun resumes; it must not mix label encodings
        was_multi = LabelScheme.of(read_json(previous)).multi_label
        if was_multi != multi_label:
            raise SupremError(f"{out} was converted {'with' if was_multi else 'without'} --multi-label; "
                              "use another dataset id or delete that folder")
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    results = map_cases(_convert_case, [(c, classes, out, multi_label) for c in cases], num_workers, "convert")
    partial = {case: missing for case, missing in results if missing}
    spec = {
        "name": name,
        "description": f"converted from the AbdomenAtlas layout at {root} by suprem_convert_abdomenatlas; "
                       + ("multi-label: bitmask label maps, overlaps kept" if multi_label
                          else "overlaps resolved smallest-mask-wins"),
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{n: i for i, n in enumerate(classes, start=1)}},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    if multi_label:
        spec["label_encoding"] = label_format.BITMASK
    if partial:
        spec["partial_labels"] = partial
    write_json(out / "dataset.json", spec)
    return out
