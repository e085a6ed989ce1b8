"""DICOM series as sources: multi-frame volumes, and the instances a derived object must reference.

A single-frame series (one file per slice) is read by SimpleITK/GDCM
(:func:`suprem_net.inference.inputs.read_dicom`); GDCM sorts the files along the slice normal
and the array's slice ``k`` is file ``k`` of :func:`series_files`. A multi-frame image (one file,
e.g. Enhanced or Legacy Converted Enhanced CT, any transfer syntax pydicom can decode, JPEG 2000
through pylibjpeg-openjpeg) is read here with pydicom: frames are sorted along the normal of
their plane orientation, must be evenly spaced on one line (no gantry tilt), and the rescale of
each frame is applied. Either way the result follows :mod:`suprem_net.io.image`: array (z, y, x),
``Geometry`` in SimpleITK's (LPS) convention with the direction's columns = row direction
(x, along a row), column direction (y), slice normal (z).

:func:`load_source` gives the header datasets of a series in the array's slice order (or, for a
multi-frame image, the frame of each slice) after checking that every instance lies exactly on a
given geometry, so that anything derived from it (a DICOM-SEG) references the right instances.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from suprem_net.errors import InputError
from suprem_net.io.image import Geometry

logger = logging.getLogger(__name__)

POSITION_TOLERANCE = 0.01  # a slice may lie this fraction of the smallest spacing off the grid
ORIENTATION_TOLERANCE = 1e-4


def series_files(folder: Path) -> list[str]:
    """The files of the one DICOM series in ``folder``, in GDCM's slice order (SimpleITK's array order)."""
    import SimpleITK as sitk

    try:
        ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])
    except RuntimeError:
        ids = []
    if len(ids) != 1:
        raise InputError(folder, f"expected one DICOM series, found {len(ids)}")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))


def read_header(path: str | Path) -> Dataset:
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError) as e:
        raise InputError(path, f"cannot read DICOM header ({e})") from None


def is_multiframe(ds: Dataset) -> bool:
    return int(ds.get("NumberOfFrames", 1) or 1) > 1


def _frame_item(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """The item of functional group ``sequence`` for ``frame``: per-frame first, else shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) > frame and sequence in per_frame[frame]:
        return per_frame[frame][sequence][0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and sequence in shared[0]:
        return shared[0][sequence][0]
    return None


def _frame_value(ds: Dataset, frame: int, sequence: str, keyword: str, path) -> list[float]:
    item = _frame_item(ds, frame, sequence)
    if item is None or keyword not in item:
        raise InputError(path, f"frame {frame + 1} has no {keyword} ({sequence})")
    return [float(v) for v in item[keyword].value]


@dataclass(frozen=True)
class FrameLayout:
    """Where the frames of a multi-frame image lie: ``order[k]`` is the frame of slice ``k``."""

    order: np.ndarray
    geometry: Geometry


def multiframe_layout(ds: Dataset, path) -> FrameLayout:
    """Sort the frames along the slice normal and check they form one evenly spaced grid."""
    n = int(ds.NumberOfFrames)
    iops = np.array([_frame_value(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient", path)
                     for f in range(n)])
    if not np.allclose(iops, iops[0], atol=ORIENTATION_TOLERANCE):
        raise InputError(path, "the frames have different orientations (not one volume)")
    spacings = np.array([_frame_value(ds, f, "PixelMeasuresSequence", "PixelSpacing", path) for f in range(n)])
    if not np.allclose(spacings, spacings[0], rtol=1e-4):
        raise InputError(path, "the frames have different pixel spacings (not one volume)")
    positions = np.array([_frame_value(ds, f, "PlanePositionSequence", "ImagePositionPatient", path)
                          for f in range(n)])
    row, col = iops[0][:3], iops[0][3:]
    normal = np.cross(row, col)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    if steps.min() <= 0:
        raise InputError(path, "two frames lie at the same position (several volumes in one file?)")
    dz = float(steps.mean())
    pixel = (float(spacings[0][0]), float(spacings[0][1]))  # PixelSpacing: between rows (y), between columns (x)
    geometry = Geometry(shape=(n, int(ds.Rows), int(ds.Columns)), spacing=(dz, *pixel),
                        origin=tuple(float(v) for v in positions[order[0]]),
                        direction=tuple(float(v) for v in np.stack([row, col, normal], axis=1).ravel()))
    off = _grid_offsets(positions[order], geometry)
    worst = int(np.argmax(off))
    if off[worst] > POSITION_TOLERANCE * min(geometry.spacing):
        raise InputError(path, f"the frames are not on one evenly spaced grid (slice {worst + 1} lies "
                               f"{off[worst]:.3f} mm off it; gantry tilt or uneven spacing is not supported)")
    return FrameLayout(order=order, geometry=geometry)


def slice_positions(geometry: Geometry) -> np.ndarray:
    """World (x, y, z) position of the first voxel of every slice of ``geometry``."""
    d = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    k = np.arange(geometry.shape[0])[:, None]
    return np.asarray(geometry.origin, dtype=float) + k * geometry.spacing[0] * d[:, 2]


def _grid_offsets(positions: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Distance (mm) of each slice's position to where ``geometry`` puts that slice."""
    return np.linalg.norm(positions - slice_positions(geometry), axis=1)


def read_multiframe(path: Path) -> tuple[np.ndarray, Geometry]:
    """A multi-frame DICOM image as a (z, y, x) float32 array (rescale applied) and its geometry."""
    try:
        ds = pydicom.dcmread(str(path))
    except (pydicom.errors.InvalidDicomError, OSError, ValueError) as e:
        raise InputError(path, f"cannot read DICOM file ({e})") from None
    layout = multiframe_layout(ds, path)
    try:
        frames = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - pydicom raises several types for a missing or failing codec
        raise InputError(path, f"cannot decode the pixel data (transfer syntax "
                               f"{ds.file_meta.TransferSyntaxUID.name}): {str(e).splitlines()[0]}") from None
    if frames.ndim != 3:
        raise InputError(path, f"expected one value per pixel, got pixel data of shape {frames.shape}")
    arr = np.empty(frames.shape, dtype=np.float32)
    for k, f in enumerate(layout.order):
        slope, intercept = _rescale(ds, int(f))
        arr[k] = frames[f].astype(np.float32) * slope + intercept
    return arr, layout.geometry


def _rescale(ds: Dataset, frame: int) -> tuple[float, float]:
    item = _frame_item(ds, frame, "PixelValueTransformationSequence")
    src = item if item is not None and "RescaleSlope" in item else ds
    return float(src.get("RescaleSlope", 1.0) or 1.0), float(src.get("RescaleIntercept", 0.0) or 0.0)


@dataclass(frozen=True)
class DicomSource:
    """The instances a derived object references, checked against the geometry they were read with.

    ``datasets``: the single-frame instances in the array's slice order, or the one multi-frame
    image (headers only). ``frame_order``: for a multi-frame image, the frame of each slice.
    """

    folder: Path
    datasets: tuple[Dataset, ...]
    frame_order: np.ndarray | None = None

    def to_frames(self, arr: np.ndarray) -> np.ndarray:
        """A (z, y, x[, ...]) array in the source's frame order (file order of the frames)."""
        if self.frame_order is None:
            return arr
        frames = np.empty_like(arr)
        frames[self.frame_order] = arr
        return frames


def load_source(folder: str | Path, geometry: Geometry) -> DicomSource:
    """The headers of the DICOM series in ``folder``, checked to lie exactly on ``geometry``."""
    folder = Path(folder)
    files = series_files(folder)
    headers = [read_header(f) for f in files]
    if len(headers) == 1 and is_multiframe(headers[0]):
        layout = multiframe_layout(headers[0], files[0])
        shared = headers[0].get("SharedFunctionalGroupsSequence") or [Dataset()]
        for group in ("PlaneOrientationSequence", "PixelMeasuresSequence"):
            if group not in shared[0]:
                raise InputError(files[0], f"{group} is given per frame, not shared by all frames: a derived "
                                           "DICOM-SEG cannot copy it")
        diff = layout.geometry.mismatch(geometry)
        if diff:
            raise InputError(files[0], f"the frames do not lie on the grid the image was read with: {diff}")
        source = DicomSource(folder, (headers[0],), layout.order)
    else:
        _check_slices(folder, files, headers, geometry)
        source = DicomSource(folder, tuple(headers))
    _check_references(folder, source.datasets)
    return DicomSource(source.folder, tuple(_with_slice_thickness(h, geometry) for h in source.datasets),
                       source.frame_order)


def _check_slices(folder: Path, files: list[str], headers: list[Dataset], geometry: Geometry) -> None:
    if len(headers) != geometry.shape[0]:
        raise InputError(folder, f"{len(headers)} DICOM files for {geometry.shape[0]} slices")
    d = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    for f, h in zip(files, headers):
        if (int(h.get("Rows", 0)), int(h.get("Columns", 0))) != tuple(geometry.shape[1:]):
            raise InputError(f, f"size {h.get('Columns')}x{h.get('Rows')} differs from the series' "
                                f"{geometry.shape[2]}x{geometry.shape[1]}")
        iop = np.asarray([float(v) for v in h.get("ImageOrientationPatient", [])] or [np.nan] * 6)
        if not np.allclose(iop, np.concatenate([d[:, 0], d[:, 1]]), atol=ORIENTATION_TOLERANCE):
            raise InputError(f, "ImageOrientationPatient missing or different from the series' orientation")
    try:
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    except AttributeError:
        raise InputError(folder, "a file has no ImagePositionPatient") from None
    off = _grid_offsets(positions, geometry)
    worst = int(np.argmax(off))
    if off[worst] > POSITION_TOLERANCE * min(geometry.spacing):
        raise InputError(files[worst], f"lies {off[worst]:.3f} mm off the evenly spaced grid the series was read "
                                       "with (uneven slice spacing or gantry tilt): cannot reference it exactly")


def _check_references(folder: Path, datasets: tuple[Dataset, ...]) -> None:
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID"):
        values = {str(ds.get(key, "") or "") for ds in datasets}
        if "" in values:
            raise InputError(folder, f"a file has no {key}: a derived DICOM object cannot reference it")
        if key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID") and len(values) > 1:
            raise InputError(folder, f"the files disagree on {key} ({len(values)} values)")
    if len({ds.SOPInstanceUID for ds in datasets}) != len(datasets):
        raise InputError(folder, "two files share a SOPInstanceUID")


def _with_slice_thickness(ds: Dataset, geometry: Geometry) -> Dataset:
    """``ds`` or, when it lacks SliceThickness (type 2, often empty), a copy stating the slice spacing
    (derived objects copy the source's pixel measures; the files are not touched)."""
    if is_multiframe(ds) or ds.get("SliceThickness") not in (None, ""):
        return ds
    out = copy.deepcopy(ds)
    out.SliceThickness = round(geometry.spacing[0], 6)
    logger.debug("%s: no SliceThickness, using the slice spacing %.4g mm", ds.get("SOPInstanceUID"), geometry.spacing[0])
    return out
