"""Where ``suprem_predict`` writes each case and in which forms: a label map in the input's format
(``flat``), the AbdomenAtlas layout (``abdomenatlas``: ``CASE/segmentations/<class>.nii.gz`` and
``CASE/combined_labels.nii.gz``), a DICOM Segmentation (``dicom-seg``), plus optional organ
statistics, probabilities and a preview picture. The label output is written last, so a case
whose label output exists (and its statistics, when asked for) is done."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from suprem_net.errors import SupremError
from suprem_net.inference import export
from suprem_net.inference.inputs import Case, require_dicom
from suprem_net.inference.multilabel import write_per_organ_bitmask
from suprem_net.inference.preview import write_preview
from suprem_net.inference.statistics import case_statistics, statistics_paths, write_statistics
from suprem_net.io.dicom_seg import write_dicom_seg
from suprem_net.io.image import IMAGE_ENDINGS, Geometry

LAYOUTS = ("flat", "abdomenatlas")
OUTPUT_TYPES = ("image", "dicom-seg")
CT_PREVIEW_WINDOW = (-160.0, 240.0)  # HU shown in the preview of a CT


@dataclass
class Prediction:
    """One case's results: the label map, and for multi-label models every class's own mask."""

    labels: np.ndarray
    bits: np.ndarray | None = None           # bitmask (bit c-1 = class c) of a multi-label model
    probabilities: np.ndarray | None = None


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


@dataclass
class CaseOutputs:
    """The outputs of one ``suprem_predict`` run (see the module docstring)."""

    input: Path
    output: Path
    layout: str = "flat"
    output_type: str = "image"
    statistics: bool = False
    probabilities: bool = False
    preview: bool = False

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise SupremError(f"output layout {self.layout!r}: choose {' or '.join(LAYOUTS)}")
        if self.output_type not in OUTPUT_TYPES:
            raise SupremError(f"output type {self.output_type!r}: choose {' or '.join(OUTPUT_TYPES)}")
        if self.dicom_seg and self.per_case_folder:
            raise SupremError("--output-type dicom-seg writes one file per case; it cannot be combined with the "
                              "abdomenatlas layout")
        if self.dicom_seg and any(self.output.name.endswith(e) for e in IMAGE_ENDINGS):
            raise SupremError(f"{self.output}: --output-type dicom-seg writes DICOM; give a folder or a .dcm file name")
        endings = (".dcm",) if self.dicom_seg else IMAGE_ENDINGS
        self.to_file = any(self.output.name.endswith(e) for e in endings) and not self.per_case_folder
        if self.to_file and self.output.is_dir():
            raise SupremError(f"{self.output}: is a folder; give an output file name or a folder without an image "
                              "ending")
        if self.input.is_dir() and _is_within(self.output, self.input):
            raise SupremError(f"{self.output}: the output must not lie inside the input folder {self.input}")
        if self.input.is_file() and self.output.exists() and self.output.resolve() == self.input.resolve():
            raise SupremError(f"{self.output}: the output would overwrite the input")

    @property
    def dicom_seg(self) -> bool:
        return self.output_type == "dicom-seg"

    @property
    def per_case_folder(self) -> bool:
        return self.layout == "abdomenatlas"

    def check_cases(self, cases: list[Case]) -> None:
        if self.to_file and len(cases) > 1:
            raise SupremError(f"{self.output}: several cases in the input, give an output folder")
        if self.dicom_seg:
            require_dicom(cases, "--output-type dicom-seg must reference the source DICOM series")

    def target(self, case: Case) -> Path:
        """The label output of ``case`` (written last)."""
        if self.per_case_folder:
            return self.output / case.name / "combined_labels.nii.gz"
        if self.to_file:
            return self.output
        return self.output / f"{case.name}{'.dcm' if self.dicom_seg else case.ending}"

    def _stem(self, case: Case) -> Path:
        if self.to_file:
            name = self.output.name
            return self.output.parent / next(name[: -len(e)] for e in (*IMAGE_ENDINGS, ".dcm") if name.endswith(e))
        return self.output / case.name

    def _extra(self, case: Case, suffix: str, in_folder: str) -> Path:
        return self.output / case.name / in_folder if self.per_case_folder else Path(f"{self._stem(case)}{suffix}")

    def _statistics_paths(self, case: Case) -> tuple[Path, Path]:
        return statistics_paths(self._stem(case), case_folder=self.per_case_folder)

    def done(self, case: Case) -> bool:
        return self.target(case).exists() and (not self.statistics or
                                               all(p.exists() for p in self._statistics_paths(case)))

    def write(self, case: Case, image: np.ndarray | None, geometry: Geometry, pred: Prediction,
              class_names: dict[int, str], ct: bool, dicom_source=None) -> Path:
        """Write every output of ``case``; returns its label output. ``image`` (the first channel) is
        needed only for the statistics and the preview."""
        masks = pred.bits if pred.bits is not None else pred.labels
        if self.probabilities:
            export.write_probabilities(self._extra(case, ".npz", "probabilities.npz"), pred.probabilities,
                                       class_names)
        if self.preview:
            write_preview(self._extra(case, ".png", "preview.png"), image, pred.labels, geometry, class_names,
                          window=CT_PREVIEW_WINDOW if ct else None, title=case.name)
        if self.statistics:
            rows = case_statistics(image, masks, geometry, class_names, bitmask=pred.bits is not None)
            write_statistics(*self._statistics_paths(case), case.name, rows)
        target = self.target(case)
        if self.dicom_seg:
            write_dicom_seg(target, masks, dicom_source, class_names, bitmask=pred.bits is not None)
        elif self.per_case_folder and pred.bits is not None:
            write_per_organ_bitmask(target.parent, pred.labels, pred.bits, geometry, class_names)
        elif self.per_case_folder:
            export.write_per_organ(target.parent, pred.labels, geometry, class_names)
        else:
            export.write_labels(target, pred.labels, geometry)
        return target
