"""Find the cases in ``suprem_predict``'s INPUT and read them.

INPUT may be

* one image file (NIfTI, NRRD, MHA, ...): one case, single channel;
* a folder of image files: nnU-Net naming ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ...
  groups channels by case (a file without the ``_000k`` suffix is a single-channel case);
* a folder of case folders: AbdomenAtlas layout ``CASE/ct.nii.gz`` (a case folder that holds
  one DICOM series instead is read as that series);
* a DICOM series folder: single-frame files (read with SimpleITK/GDCM) or one multi-frame
  image such as Enhanced CT (read with pydicom, see :mod:`suprem_net.io.dicom`); a folder with
  several series is refused with a list of them.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from suprem_net.errors import InputError
from suprem_net.io.image import IMAGE_ENDINGS, Geometry, check_3d, short_error, read_image, strip_ending

logger = logging.getLogger(__name__)

_CHANNEL = re.compile(r"^(.+)_(\d{4})$")


@dataclass
class Case:
    """One case: image files (one per channel) or a DICOM series folder."""

    name: str
    files: list[Path] = field(default_factory=list)
    dicom_dir: Path | None = None
    ending: str = ".nii.gz"  # file ending for the output label map

    @property
    def source(self) -> str:
        return str(self.dicom_dir if self.dicom_dir is not None else self.files[0])


def _ending(path: Path) -> str:
    for end in IMAGE_ENDINGS:
        if path.name.endswith(end):
            return end
    return ""


def dicom_series(folder: Path) -> list[str]:
    """Series instance UIDs of the DICOM series directly in ``folder``."""
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])
    except RuntimeError:
        return []


def _dicom_case(folder: Path, name: str) -> Case | None:
    ids = dicom_series(folder)
    if not ids:
        return None
    if len(ids) > 1:
        described = []
        for sid in ids:
            n = len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid))
            described.append(f"{sid} ({n} files)")
        raise InputError(folder, f"holds {len(ids)} DICOM series; put each in its own folder: "
                                 + ", ".join(described))
    return Case(name=name, dicom_dir=folder)


def discover_cases(input_path: str | Path, num_channels: int = 1) -> list[Case]:
    """All cases under ``input_path`` (see the module docstring), sorted by name."""
    p = Path(input_path)
    if not p.exists():
        raise InputError(p, "not found")
    if p.is_file():
        if not _ending(p):
            raise InputError(p, f"not a supported image file (expected one of {', '.join(IMAGE_ENDINGS)}, "
                                "or a DICOM series folder)")
        m = _CHANNEL.match(strip_ending(p.name))
        cases = [Case(name=m.group(1) if m else strip_ending(p.name), files=[p], ending=_ending(p))]
    else:
        cases = _folder_cases(p)
    for case in cases:
        if case.dicom_dir is None and len(case.files) != num_channels:
            raise InputError(case.files[0], f"case {case.name} has {len(case.files)} channel(s), "
                                            f"the model expects {num_channels}")
        if case.dicom_dir is not None and num_channels != 1:
            raise InputError(case.dicom_dir, f"a DICOM series is one channel, the model expects {num_channels}")
    return cases


def require_dicom(cases: list[Case], why: str) -> None:
    """Refuse, in one line, the first case that is not a DICOM series."""
    others = [c for c in cases if c.dicom_dir is None]
    if others:
        more = f" (and {len(others) - 1} more case(s))" if len(others) > 1 else ""
        raise InputError(others[0].files[0], f"not a DICOM series{more}: {why}")


def _folder_cases(p: Path) -> list[Case]:
    images = sorted(f for f in p.iterdir() if f.is_file() and _ending(f) and not f.name.startswith("."))
    if images:
        groups: dict[str, dict[int, Path]] = {}
        for f in images:
            stem = strip_ending(f.name)
            m = _CHANNEL.match(stem)
            name, ch = (m.group(1), int(m.group(2))) if m else (stem, 0)
            if ch in groups.setdefault(name, {}):
                raise InputError(f, f"two files for channel {ch} of case {name}")
            groups[name][ch] = f
        cases = []
        for name, chans in sorted(groups.items()):
            if sorted(chans) != list(range(len(chans))):
                raise InputError(p / name, f"case {name} has channels {sorted(chans)}; expected 0..{len(chans) - 1}")
            files = [chans[c] for c in range(len(chans))]
            cases.append(Case(name=name, files=files, ending=_ending(files[0])))
        return cases
    subdirs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
    cases = []
    for d in subdirs:
        ct = d / "ct.nii.gz"
        if ct.is_file():
            cases.append(Case(name=d.name, files=[ct]))
        else:
            c = _dicom_case(d, d.name)
            if c is not None:
                cases.append(c)
    if cases:
        return cases
    c = _dicom_case(p, p.name)
    if c is not None:
        return [c]
    raise InputError(p, "no images found (expected image files, CASE/ct.nii.gz folders or a DICOM series)")


def read_dicom(folder: Path) -> tuple[np.ndarray, Geometry]:
    """A series of single-frame files through SimpleITK/GDCM, or one multi-frame file through
    pydicom (:mod:`suprem_net.io.dicom`)."""
    from suprem_net.io import dicom

    files = dicom.series_files(folder)
    if dicom.is_multiframe(dicom.read_header(files[0])):
        if len(files) > 1:
            raise InputError(folder, f"a series of {len(files)} multi-frame files; one multi-frame image per "
                                     "folder is supported")
        return dicom.read_multiframe(Path(files[0]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise InputError(folder, f"cannot read DICOM series ({short_error(e)})") from None
    check_3d(img, folder)
    return sitk.GetArrayFromImage(img).astype(np.float32), Geometry.from_sitk(img)


def _compact(arr: np.ndarray) -> np.ndarray:
    """Integer pixels as they are (an int16 CT takes half the memory of float32; preprocessing converts
    one channel at a time), any other type as float32."""
    return arr if arr.dtype.kind in "iu" and arr.dtype.itemsize <= 4 else arr.astype(np.float32, copy=False)


def read_case(case: Case) -> tuple[list[np.ndarray], Geometry]:
    """The channel arrays (z, y, x), integer as stored or float32, and the geometry of the first channel."""
    if case.dicom_dir is not None:
        arr, geo = read_dicom(case.dicom_dir)
        return [arr], geo
    arrays, geo = [], None
    for f in case.files:
        arr, g = read_image(f, dtype=None)
        arr = _compact(arr)
        if geo is None:
            geo = g
        else:
            diff = geo.mismatch(g)
            if diff:
                raise InputError(f, f"geometry differs from {case.files[0].name}: {diff}")
        arrays.append(arr)
    return arrays, geo
