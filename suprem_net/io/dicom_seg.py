"""DICOM Segmentation (DICOM-SEG) output with highdicom, referencing the source series.

One SEG instance per case (BINARY, a new series in the source's study): it copies the patient
and study of the source, references every source instance (single-frame series) or every frame
(multi-frame image) through the Referenced Series and Derivation Image sequences, takes its
Frame of Reference, orientation, pixel spacing and plane positions from the source, and has one
frame per segment and source slice that holds foreground (empty frames are omitted; decoding
puts zeros there). The caller checks the source against the grid the prediction is on
(:func:`suprem_net.io.dicom.load_source`), so frames lie exactly on the source geometry.

Segments: one per class of the model (``class_names`` 1..C, background not a segment) with the
class name as Segment Label. Where a standard code is known (:data:`ANATOMY`) the segment gets
it: category Anatomical Structure (SCT 91723000) and the organ as property type, laterality as a
type modifier (SCT 7771000 Left / 24028007 Right); tumours and cysts get category Morphologically
Abnormal Structure (SCT 49755003), type Neoplasm (SCT 108369006) or Cyst (SCT 367643001) and the
organ as anatomic region. Other names get category and type Tissue (SCT 85756007), the generic
code 3D Slicer also uses for an unspecified segment. Every code is taken from pydicom's copy of
the DICOM standard's code tables (``pydicom.sr.codedict``), by name, so none is typed in here.
The table is documented in docs/predict.md.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from suprem_net import __version__
from suprem_net.io.atomic import atomic_path
from suprem_net.io.dicom import DicomSource

logger = logging.getLogger(__name__)

SERIES_NUMBER = 1000  # series number of the SEG series (DICOM needs one; viewers list it after the CT)


@dataclass(frozen=True)
class Coding:
    """Codes of one class, as pydicom ``codes.SCT`` attribute names."""

    type: str
    laterality: str | None = None  # "Left" / "Right": Segmented Property Type Modifier
    region: str | None = None  # anatomic region of a lesion
    lesion: bool = False  # category Morphologically Abnormal Structure instead of Anatomical Structure


def _organ(name: str) -> tuple[str, str | None]:
    for side in ("Left", "Right"):
        if name.endswith("_" + side.lower()):
            return name[: -len(side) - 1], side
    return name, None


_ORGANS = {  # class name (laterality suffix removed) -> SCT concept
    "aorta": "Aorta", "gall_bladder": "Gallbladder", "gallbladder": "Gallbladder", "kidney": "Kidney",
    "liver": "Liver", "pancreas": "Pancreas", "postcava": "InferiorVenaCava", "inferior_vena_cava": "InferiorVenaCava",
    "spleen": "Spleen", "stomach": "Stomach", "adrenal_gland": "AdrenalGland", "bladder": "Bladder",
    "urinary_bladder": "Bladder", "celiac_trunk": "CeliacAxis", "colon": "Colon", "duodenum": "Duodenum",
    "esophagus": "Esophagus", "femur": "Femur", "lung": "Lung", "prostate": "Prostate", "rectum": "Rectum",
    "portal_vein": "PortalVein", "splenic_vein": "SplenicVein", "small_bowel": "SmallIntestine",
    "small_intestine": "SmallIntestine",
}
_LESIONS = {"tumor": "Neoplasm", "cyst": "Cyst"}  # <organ>_tumor, <organ>_cyst


def coding_for(name: str) -> Coding | None:
    """The standard codes of a class name, or None when no standard concept is known for it."""
    base, side = _organ(name)
    if base in _ORGANS:
        return Coding(_ORGANS[base], laterality=side)
    if name in _LESIONS:
        return Coding(_LESIONS[name], lesion=True)
    for suffix, concept in _LESIONS.items():
        if name.endswith("_" + suffix):
            organ = _ORGANS.get(_organ(name[: -len(suffix) - 1])[0])
            return Coding(concept, region=organ, lesion=True)
    return None


ANATOMY = {n: coding_for(n) for n in (
    "aorta", "gall_bladder", "kidney_left", "kidney_right", "liver", "pancreas", "postcava", "spleen", "stomach",
    "adrenal_gland_left", "adrenal_gland_right", "bladder", "celiac_trunk", "colon", "duodenum", "esophagus",
    "femur_left", "femur_right", "lung_left", "lung_right", "prostate", "rectum", "liver_tumor", "kidney_tumor",
    "pancreas_tumor", "colon_tumor", "lung_tumor", "kidney_cyst")}
"""The AbdomenAtlas / Universal-Model classes with a code (hepatic_vessel, intestine and
portal_vein_and_splenic_vein have no single standard concept and are coded as Tissue)."""


def segment_descriptions(class_names: dict[int, str]) -> list:
    """highdicom segment descriptions for classes 1..C (segment number = class number)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name="suprem_net", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    out = []
    for number in sorted(v for v in class_names if v > 0):
        name = class_names[number]
        coding = coding_for(name)
        if coding is None:
            category, kind, region = codes.SCT.Tissue, codes.SCT.Tissue, None
        else:
            category = codes.SCT.MorphologicallyAbnormalStructure if coding.lesion else codes.SCT.AnatomicalStructure
            kind = getattr(codes.SCT, coding.type)
            region = getattr(codes.SCT, coding.region) if coding.region else None
        desc = hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, anatomic_regions=[region] if region else None)
        if coding is not None and coding.laterality:
            modifier = hd.sr.CodedConcept.from_code(getattr(codes.SCT, coding.laterality))
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
        out.append(desc)
    return out


def write_dicom_seg(path: str | Path, seg: np.ndarray, source: DicomSource, class_names: dict[int, str], *,
                    bitmask: bool = False, description: str = "suprem_net segmentation") -> None:
    """Write ``seg`` (z, y, x) on ``source``'s grid as one DICOM-SEG file, atomically.

    ``seg`` is a label map (values = class numbers) or, with ``bitmask``, a bitmask (bit c-1 =
    class c) whose classes may overlap: each class then becomes its own binary segment.
    """
    import highdicom as hd

    frames = source.to_frames(np.asarray(seg))
    numbers = sorted(v for v in class_names if v > 0)
    if bitmask:
        bits = frames.astype(np.uint64)
        pixels = np.stack([(bits >> np.uint64(c - 1)) & np.uint64(1) for c in numbers], axis=-1).astype(np.uint8)
    else:
        if frames.size and int(frames.max()) > max(numbers, default=0):
            raise ValueError(f"label {int(frames.max())} has no class name")
        pixels = frames.astype(np.uint8 if max(numbers, default=0) < 256 else np.uint16, copy=False)
    with _quiet("highdicom"):  # it logs every module it copies at INFO
        obj = _segmentation(hd, source, pixels, class_names, description)
    with atomic_path(path) as tmp:
        obj.save_as(str(tmp))
    logger.debug("%s: %d segment(s), %d frame(s), references %d instance(s) of series %s", path, len(numbers),
                 int(obj.NumberOfFrames), len(source.datasets), source.datasets[0].SeriesInstanceUID)


@contextmanager
def _quiet(name: str):
    """Raise logger ``name`` to WARNING for the block, unless suprem_net logs at DEBUG (``-v``)."""
    other = logging.getLogger(name)
    level = other.level
    if not logger.isEnabledFor(logging.DEBUG):
        other.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        other.setLevel(level)


def _segmentation(hd, source: DicomSource, pixels: np.ndarray, class_names: dict[int, str], description: str):
    return hd.seg.Segmentation(
        source_images=list(source.datasets), pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(class_names),
        series_instance_uid=hd.UID(), series_number=SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="suprem_net", manufacturer_model_name="suprem_net", software_versions=__version__,
        device_serial_number="none", content_label="SEGMENTATION", content_description=description[:64],
        series_description=description[:64])
