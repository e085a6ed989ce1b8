"""Dataset integrity checks. Every problem is one line naming the file.

The cheap checks (headers only) always run before anything is written: dataset.json,
case ids, missing labels, numTraining, 3D, geometry of image vs label. The voxel checks
(NaN/Inf, label values in dataset.json, integer labels) run while the fingerprint reads
the voxels anyway (see :func:`voxel_problems`), so they cost nothing extra.
"""
from __future__ import annotations

import numpy as np

from suprem_net.errors import InputError, SupremError
from suprem_net.io.dataset import SAFE_CASE_ID, RawDataset
from suprem_net.io.image import IMAGE_ENDINGS, has_nonfinite, read_header, strip_ending
from suprem_net.labels import value_problem


class IntegrityError(SupremError):
    """Several problems, one line each; ``str()`` joins them with newlines."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))

    def __reduce__(self):  # picklable across worker processes with its list of problems
        return type(self), (self.problems,)


def header_problems(ds: RawDataset) -> list[str]:
    problems: list[str] = []
    try:
        cases = ds.training_cases()
    except InputError as e:
        return [str(e)]
    if not cases:
        return [f"{ds.root / 'imagesTr'}: no training images named CASE_0000{ds.file_ending}"]
    if len(cases) != ds.spec["numTraining"]:
        problems.append(f"{ds.root / 'dataset.json'}: numTraining is {ds.spec['numTraining']} "
                        f"but imagesTr holds {len(cases)} cases")
    label_dir = ds.root / "labelsTr"
    known = {c.case_id for c in cases}
    if label_dir.is_dir():
        for p in sorted(label_dir.iterdir()):
            if p.name.endswith(ds.file_ending) and p.name[: -len(ds.file_ending)] not in known:
                problems.append(f"{p}: label without an image in imagesTr")
    problems += _duplicate_problems(ds, cases, known)
    for case in cases:
        if not SAFE_CASE_ID.fullmatch(case.case_id) or ".." in case.case_id:
            problems.append(f"{case.images[0]}: case id {case.case_id!r} is not a safe file name")
            continue
        try:
            ref, _ = read_header(case.images[0])
            for other in case.images[1:]:
                geo, _ = read_header(other)
                diff = ref.mismatch(geo)
                if diff:
                    problems.append(f"{other}: geometry differs from {case.images[0].name}: {diff}")
            if not case.label.is_file():
                problems.append(f"{case.label}: label file missing for case {case.case_id}")
                continue
            geo, _ = read_header(case.label)
            diff = ref.mismatch(geo)
            if diff:
                problems.append(f"{case.label}: geometry differs from its image: {diff}")
        except InputError as e:
            problems.append(str(e))
    return problems


def _duplicate_problems(ds: RawDataset, cases: list, known: set[str]) -> list[str]:
    """Two files for one case: the same name with another image ending (``case_0000.nii`` next to
    ``case_0000.nii.gz``), or case ids that differ only in letter case (one file on macOS/Windows)."""
    problems = []
    for folder, channel in ((ds.root / "imagesTr", True), (ds.root / "labelsTr", False)):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            stem = strip_ending(p.name)
            if p.name.endswith(ds.file_ending) or not p.name.endswith(IMAGE_ENDINGS):
                continue
            case_id = stem[:-5] if channel and len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit() else stem
            if case_id in known:
                problems.append(f"{p}: duplicate of case {case_id} with another file ending "
                                f"(dataset.json file_ending is {ds.file_ending!r})")
    first: dict[str, str] = {}
    for case in cases:
        other = first.setdefault(case.case_id.lower(), case.case_id)
        if other != case.case_id:
            problems.append(f"{case.images[0]}: duplicate case id {case.case_id!r}: differs from {other!r} only in "
                            "letter case (the two collide on case-insensitive file systems)")
    return problems


def voxel_problems(case_id: str, image_paths, images: list[np.ndarray], label_path,
                   label: np.ndarray, allowed_labels: set[int], bitmask_classes: int | None = None) -> list[str]:
    """Image and label value problems. ``bitmask_classes`` (multi-label datasets): the label is a
    bitmask of that many classes, so any OR-combination of the class bits is allowed."""
    problems = []
    for p, im in zip(image_paths, images):
        if has_nonfinite(p, im):
            problems.append(f"{p}: image contains NaN or Inf values")
        elif im.size and im.min() == im.max():
            problems.append(f"{p}: image is constant (every voxel is {float(im.flat[0]):g}): an empty or failed export?")
    if bitmask_classes is not None:
        problem = value_problem(label, bitmask_classes)
        return problems + ([f"{label_path}: {problem}"] if problem else [])
    if np.issubdtype(label.dtype, np.floating) and not np.array_equal(label, np.round(label)):
        problems.append(f"{label_path}: label has non-integer values")
        return problems
    values = set(np.unique(label).astype(int).tolist())
    unknown = sorted(values - allowed_labels)
    if unknown:
        problems.append(f"{label_path}: label values {unknown} are not in dataset.json labels")
    return problems
