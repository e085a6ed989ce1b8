"""DICOM in and DICOM-SEG out: oblique single-frame series, JPEG 2000 multi-frame (Legacy Converted
Enhanced CT) with its frames out of order, overlapping (multi-label) segments, refusals.
Every SEG is read back with highdicom and decoded on the source's own instances/frames."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from suprem_net.errors import InputError
from suprem_net.inference.inputs import discover_cases, read_case
from suprem_net.io.dicom import load_source, slice_positions
from suprem_net.io.dicom_seg import write_dicom_seg
from suprem_net.io.image import Geometry
from tests.helpers import write_dicom_series

NAMES = {0: "background", 1: "liver", 2: "kidney_left", 3: "spleen", 4: "my_structure"}


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", [ax, ay, az], degrees=True).as_matrix()


OBLIQUE = Geometry(shape=(6, 32, 36), spacing=(2.5, 0.8, 0.7), origin=(10.0, -20.0, 5.0),
                   direction=tuple(_rotation(20, -10, 35).ravel()))


def _ct(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, shape).astype(np.int16)


def _labels(shape) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[1:4, 5:20, 3:30] = 1
    lab[2:5, 22:30, 10:12] = 2
    lab[3, 0, 0] = 4  # spleen (3) is absent, a one-voxel class at a corner
    return lab


def _compress(folder: Path) -> None:
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        ds.compress(JPEG2000Lossless)
        ds.save_as(f)


def write_multiframe(folder: Path, arr: np.ndarray, geo: Geometry, frame_order: list[int], tmp: Path) -> None:
    """One JPEG 2000 Legacy Converted Enhanced CT file whose frame f holds slice frame_order[f]."""
    write_dicom_series(tmp, arr, "1.2.826.0.1.3680043.2.1125.2.50", geo)
    datasets = [pydicom.dcmread(f) for f in sorted(tmp.iterdir())]
    logging.getLogger("highdicom").setLevel(logging.ERROR)  # the converter lists attributes it cannot fill
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(datasets, series_instance_uid=hd.UID(), series_number=3,
                                                  sop_instance_uid=hd.UID(), instance_number=1)
    positions = np.array([[float(v) for v in i.PlanePositionSequence[0].ImagePositionPatient]
                          for i in mf.PerFrameFunctionalGroupsSequence])
    by_slice = [int(np.argmin(np.linalg.norm(positions - p, axis=1))) for p in slice_positions(geo)]
    items, pixels = list(mf.PerFrameFunctionalGroupsSequence), mf.pixel_array
    pick = [by_slice[s] for s in frame_order]
    mf.PerFrameFunctionalGroupsSequence = [items[i] for i in pick]
    mf.PixelData = np.ascontiguousarray(pixels[pick]).tobytes()
    mf.compress(JPEG2000Lossless)
    folder.mkdir(parents=True)
    mf.save_as(folder / "ct.dcm")


def _read_back(path: Path, source) -> tuple[hd.seg.Segmentation, np.ndarray]:
    """The SEG and its label map decoded on the source's instances (or frames), in array order."""
    seg = hd.seg.segread(path)
    if source.frame_order is None:
        uids = [ds.SOPInstanceUID for ds in source.datasets]
        arr = seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=False,
                                                assert_missing_frames_are_empty=True)
    else:
        n = int(source.datasets[0].NumberOfFrames)
        arr = seg.get_pixels_by_source_frame(source.datasets[0].SOPInstanceUID, list(range(1, n + 1)),
                                             combine_segments=True, relabel=False,
                                             assert_missing_frames_are_empty=True)[source.frame_order]
    return seg, arr


def _check_references(seg: hd.seg.Segmentation, source) -> None:
    first = source.datasets[0]
    assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID and seg.Modality == "SEG"
    (ref,) = seg.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == first.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == \
        {ds.SOPInstanceUID for ds in source.datasets}


def _check_frames_on_source_grid(seg: hd.seg.Segmentation, geo: Geometry) -> None:
    d = np.asarray(geo.direction).reshape(3, 3)
    iop = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert np.allclose([float(v) for v in iop], np.concatenate([d[:, 0], d[:, 1]]), atol=1e-6)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert np.allclose([float(v) for v in measures.PixelSpacing], geo.spacing[1:], atol=1e-6)
    grid = slice_positions(geo)
    for item in seg.PerFrameFunctionalGroupsSequence:  # every frame lies exactly on one source slice
        p = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        assert np.linalg.norm(grid - p, axis=1).min() < 1e-4


@pytest.mark.parametrize("compressed", [False, True], ids=["oblique", "oblique-jpeg2000"])
def test_seg_of_an_oblique_single_frame_series(tmp_path, compressed):
    arr = _ct(OBLIQUE.shape)
    series = tmp_path / "series"
    write_dicom_series(series, arr, "1.2.826.0.1.3680043.2.1125.2.40", OBLIQUE)
    if compressed:
        _compress(series)
    (case,) = discover_cases(series)
    (image,), geo = read_case(case)
    assert geo.mismatch(OBLIQUE) is None and np.array_equal(image, arr)
    source = load_source(series, geo)
    lab = _labels(geo.shape)
    write_dicom_seg(tmp_path / "seg.dcm", lab, source, NAMES)

    seg, decoded = _read_back(tmp_path / "seg.dcm", source)
    assert np.array_equal(decoded, lab)  # voxel for voxel on the source's own instances
    _check_references(seg, source)
    _check_frames_on_source_grid(seg, geo)
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [
        (1, "liver"), (2, "kidney_left"), (3, "spleen"), (4, "my_structure")]
    liver, kidney, _, other = seg.SegmentSequence
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"  # Anatomical Structure
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # Liver
    ktype = kidney.SegmentedPropertyTypeCodeSequence[0]
    assert ktype.CodeValue == "64033007" and ktype.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"
    assert other.SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"  # no known code: Tissue
    assert kidney.SegmentAlgorithmType == "AUTOMATIC" and kidney.SegmentAlgorithmName == "suprem_net"


def test_seg_of_a_jpeg2000_multiframe_with_frames_out_of_order(tmp_path):
    arr = _ct(OBLIQUE.shape, seed=1)
    order = [3, 0, 5, 1, 4, 2]  # frame f holds slice order[f]
    folder = tmp_path / "enhanced"
    write_multiframe(folder, arr, OBLIQUE, order, tmp_path / "classic")
    header = pydicom.dcmread(folder / "ct.dcm", stop_before_pixels=True)
    assert header.file_meta.TransferSyntaxUID == JPEG2000Lossless and int(header.NumberOfFrames) == 6
    (case,) = discover_cases(folder)
    (image,), geo = read_case(case)
    assert geo.mismatch(OBLIQUE) is None and np.array_equal(image, arr)  # sorted along the normal, decoded
    source = load_source(folder, geo)
    assert source.frame_order.tolist() == [order.index(s) for s in range(6)]
    lab = _labels(geo.shape)
    write_dicom_seg(tmp_path / "seg.dcm", lab, source, NAMES)
    seg, decoded = _read_back(tmp_path / "seg.dcm", source)
    assert np.array_equal(decoded, lab)
    _check_references(seg, source)
    _check_frames_on_source_grid(seg, geo)
    for item in seg.PerFrameFunctionalGroupsSequence:  # each frame names the source frame it lies on
        frame = int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        p = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        src = header.PerFrameFunctionalGroupsSequence[frame - 1].PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose(p, [float(v) for v in src], atol=1e-4)

    second = pydicom.dcmread(folder / "ct.dcm")  # a second multi-frame instance of the same series
    second.SOPInstanceUID = hd.UID()
    second.save_as(folder / "ct2.dcm")
    with pytest.raises(InputError, match="a series of 2 multi-frame files"):
        read_case(case)


def test_overlapping_classes_become_separate_segments(tmp_path):
    geo = Geometry((4, 8, 9), (3.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    series = tmp_path / "series"
    write_dicom_series(series, _ct(geo.shape), "1.2.826.0.1.3680043.2.1125.2.41", geo)
    source = load_source(series, read_case(discover_cases(series)[0])[1])
    a, b = np.zeros(geo.shape, bool), np.zeros(geo.shape, bool)
    a[:, 1:6], b[1:3, 3:8] = True, True
    bits = (a * 1 + b * 4).astype(np.uint8)  # classes 1 and 3 overlap, class 2 empty
    write_dicom_seg(tmp_path / "seg.dcm", bits, source, {1: "liver", 2: "kidney_left", 3: "liver_tumor"}, bitmask=True)
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    masks = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in source.datasets],
                                              assert_missing_frames_are_empty=True)
    assert masks.shape == (*geo.shape, 3)
    assert np.array_equal(masks[..., 0], a) and not masks[..., 1].any() and np.array_equal(masks[..., 2], b)
    tumour = seg.SegmentSequence[2]
    assert tumour.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"  # Morphologically Abnormal
    assert tumour.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"  # Neoplasm
    assert tumour.AnatomicRegionSequence[0].CodeValue == "10200004"  # in the liver


def test_a_series_off_the_grid_or_without_frame_of_reference_is_refused(tmp_path):
    geo = Geometry((4, 8, 9), (3.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    series = tmp_path / "series"
    write_dicom_series(series, _ct(geo.shape), "1.2.826.0.1.3680043.2.1125.2.42", geo)
    grid = read_case(discover_cases(series)[0])[1]
    last = sorted(series.iterdir())[-1]
    ds = pydicom.dcmread(last)
    ds.ImagePositionPatient = [0.0, 0.0, 10.0]  # the last slice 1 mm off: uneven spacing
    ds.save_as(last)
    with pytest.raises(InputError, match="off the evenly spaced grid"):
        load_source(series, grid)
    shutil.rmtree(series)
    write_dicom_series(series, _ct(geo.shape), "1.2.826.0.1.3680043.2.1125.2.43", geo)
    for f in series.iterdir():
        ds = pydicom.dcmread(f)
        del ds.FrameOfReferenceUID
        ds.save_as(f)
    with pytest.raises(InputError, match="no FrameOfReferenceUID"):
        load_source(series, grid)
